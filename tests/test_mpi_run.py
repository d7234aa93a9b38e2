"""Real runs through FedML over `mpirun -np 3` (1 server + 2 client processes), offline."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="Open MPI is not installed")

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}


def mpirun(out: Path, tiny_assets, *overrides: str, np: int = 3, guard: Path | None = None, timeout: int = 300):
    model_dir, csv = tiny_assets
    env = {**os.environ, **MPI_ENV}
    cmd = [MPIRUN, "-np", str(np)]
    if guard is not None:
        env["FEDML_FIBEC_NETWORK_GUARD"] = str(guard)
        cmd += ["-x", "FEDML_FIBEC_NETWORK_GUARD"]
    cmd += [sys.executable, str(ROOT / "run_scripts" / "run_fibec.py"), "--out", str(out),
            "--set", f"model={model_dir}", "--set", "data_source=files", "--set", f"train_file={csv}",
            "--set", "client_num_in_total=6", "--set", "client_num_per_round=2", "--set", "min_samples_per_device=8",
            "--set", "min_samples=8", "--set", "local_steps=2", "--set", "batch_size=8",
            "--set", "device_eval_samples=16", "--set", "max_seq_length=16"]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fedavg_two_rounds_offline(tmp_path, tiny_assets):
    guard = tmp_path / "outbound.jsonl"
    out = tmp_path / "fedavg"
    proc = mpirun(out, tiny_assets, "federated_optimizer=FedAvg", "comm_round=2", guard=guard)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = records(out)
    assert [r["round"] for r in rows] == [0, 1]
    for key in ("method", "wall_seconds", "train_loss", "global_accuracy", "device_accuracy", "bytes_up",
                "bytes_down", "curriculum_share", "gal", "updated_neuron_share"):
        assert key in rows[0], key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "FedAvg" and summary["rounds"] == 2
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows) > 0
    assert summary["config"]["train_args"]["comm_round"] == 2
    assert "| FedAvg | 2 |" in proc.stdout and str(out) in proc.stdout
    # No Python socket in any rank tried to leave this machine.
    assert not guard.exists() or guard.read_text() == ""
    # FedML's own files stayed inside the run folder.
    assert (out / "fedml_home").is_dir()
    assert (out / "accuracy_vs_round.png").stat().st_size > 1000
    assert "| FedAvg | 2 |" in (out / "summary.md").read_text()


def test_fibecfed_three_rounds_logs_gal_and_sends_less(tmp_path, tiny_assets):
    out_f, out_a = tmp_path / "fibec", tmp_path / "avg"
    proc = mpirun(out_f, tiny_assets, "comm_round=3", "gal_ratio=0.5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = mpirun(out_a, tiny_assets, "comm_round=3", "federated_optimizer=FedAvg")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fib, avg = records(out_f), records(out_a)
    assert len(fib) == 3 and all(r["gal"] == fib[0]["gal"] and len(r["gal"]) == 1 for r in fib)
    assert all(len(r["gal"]) == 2 for r in avg)
    # Uploads after the first round carry only the GAL block and the head.
    assert all(f["bytes_up"] < 0.75 * a["bytes_up"] for f, a in zip(fib[1:], avg[1:]))
    assert any(r["curriculum_share"] < 1 for r in fib)
    assert "GAL selected" in (out_f / "logs" / "rank0.log").read_text()


def test_wrong_rank_count_fails_before_work(tmp_path, tiny_assets):
    proc = mpirun(tmp_path / "x", tiny_assets, "comm_round=1", np=4)
    assert proc.returncode != 0
    assert "client_num_per_round" in proc.stderr and "needs 3 processes" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_bad_data_file_fails_clearly(tmp_path, tiny_assets):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nfine film,1\ndull film,0\n")
    proc = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "run_fibec.py"), "--set", "data_source=files",
                           "--set", f"train_file={bad}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "DataError" in proc.stderr and str(bad) in proc.stderr and "'text'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_fails_clearly(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "run_fibec.py"), "--set", "rho=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "fibec_args.rho = 2" in proc.stderr and "Traceback" not in proc.stderr
