"""Tuning on the validation split and resuming comparisons (synthetic run folders; no mpirun)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedml_fibec import compare
from fedml_fibec.config.docs import describe_keys
from fedml_fibec.errors import ConfigError
from fedml_fibec.tuning import NULL_MEANS, GridPoint, choose, load_grid, range_edges

ROOT = Path(__file__).resolve().parent.parent


def _grid(tmp_path, text: str) -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(text)
    return p


def test_grid_points_are_the_product_in_file_order(tmp_path):
    grids = load_grid(_grid(tmp_path, "FedML-FedProx:\n  learning_rate: [0.001, 0.002]\n  fedprox_mu: [0.1, 0.01]\n"),
                      ["FedML-FedProx", "FedAvg-LoRA"])
    slugs = [p.slug for p in grids["FedML-FedProx"]]
    assert slugs == ["learning_rate=0.001,fedprox_mu=0.1", "learning_rate=0.001,fedprox_mu=0.01",
                     "learning_rate=0.002,fedprox_mu=0.1", "learning_rate=0.002,fedprox_mu=0.01"]
    assert grids["FedML-FedProx"][1].overrides == ["learning_rate=0.001", "fedprox_mu=0.01"]
    assert [p.slug for p in grids["FedAvg-LoRA"]] == ["default"]  # not in the file: its defaults
    assert GridPoint("x", (("head_learning_rate", None),)).overrides == ["head_learning_rate=null"]
    for text, message in (("FedAvg-LoRA: [1, 2]\n", "mapping of config key"),
                          ("FedAvg-LoRA:\n  learning_rate: 0.1\n", "non-empty list"),
                          ("FedAvg-LoRA:\n  learning_rate: [0.1, 0.1]\n", "listed twice"),
                          ("- a\n", "mapping of method")):
        with pytest.raises(ConfigError, match=message):
            load_grid(_grid(tmp_path, text), ["FedAvg-LoRA"])
    assert choose(grids["FedML-FedProx"], [0.7, 0.8, 0.8, None]) == 1  # the first of equal scores
    assert choose(grids["FedML-FedProx"], [None] * 4) is None
    # Equal in exact arithmetic, unequal as floats (a tie seen on stackoverflow's validation split of 1400):
    # still a tie, so the first point wins, not the one whose sum happened to round up.
    first = sum([1116 / 1400, 1115 / 1400, 1122 / 1400]) / 3
    second = sum([1119 / 1400, 1115 / 1400, 1119 / 1400]) / 3
    assert first < second  # the rounding this guards against
    assert choose(grids["FedML-FedProx"], [first, second, None, None]) == 0
    assert choose(grids["FedML-FedProx"], [first, second + 1 / 4200, None, None]) == 1  # one example more


def test_a_best_point_at_the_end_of_a_numeric_range_is_flagged_as_an_edge(tmp_path):
    points = load_grid(_grid(tmp_path, "FFA-LoRA:\n  learning_rate: [0.002, 0.005, 0.01]\n"
                                       "  head_learning_rate: [null, 0.01]\n"), ["FFA-LoRA"])["FFA-LoRA"]
    slugs = [p.slug for p in points]
    at = lambda slug: range_edges(points, slugs.index(slug))
    # head_learning_rate null trains the head at learning_rate, so its range is 0.002-0.01, not one number
    assert at("learning_rate=0.005,head_learning_rate=null") == []  # inside both
    assert at("learning_rate=0.005,head_learning_rate=0.01") == ["head_learning_rate=0.01 (the highest tried)"]
    assert at("learning_rate=0.01,head_learning_rate=0.01") == ["learning_rate=0.01 (the highest tried)",
                                                                "head_learning_rate=0.01 (the highest tried)"]
    assert at("learning_rate=0.002,head_learning_rate=null") == [
        "learning_rate=0.002 (the lowest tried)", "head_learning_rate=null (= 0.002, the lowest tried)"]
    wide = load_grid(_grid(tmp_path, "FFA-LoRA:\n  learning_rate: [0.002, 0.005]\n"
                                     "  head_learning_rate: [null, 0.001, 0.02]\n"), ["FFA-LoRA"])["FFA-LoRA"]
    assert range_edges(wide, 1) == ["learning_rate=0.002 (the lowest tried)", "head_learning_rate=0.001 (the lowest tried)"]
    assert range_edges(wide, 3) == ["learning_rate=0.005 (the highest tried)"]  # head null = 0.005: inside 0.001-0.02
    # the tuner's reading of null is the config's own: each NULL_MEANS key's help says what its null means
    keys = {line.split("`")[1]: line for line in describe_keys().splitlines() if line.startswith("| `")}
    for key, stands_for in NULL_MEANS.items():
        assert f"null = {stands_for}" in keys[key]
    two = load_grid(_grid(tmp_path, "FedML-FedOpt-Adam:\n  learning_rate: [0.002, 0.005]\n"
                                    "  server_lr: [0.001, 0.003, 0.01]\n"), ["FedML-FedOpt-Adam"])["FedML-FedOpt-Adam"]
    assert range_edges(two, 0) == ["learning_rate=0.002 (the lowest tried)", "server_lr=0.001 (the lowest tried)"]
    assert range_edges(two, 4) == ["learning_rate=0.005 (the highest tried)"]
    assert range_edges(load_grid(_grid(tmp_path, "FedAvg-LoRA:\n  learning_rate: [0.01]\n"),
                                 ["FedAvg-LoRA"])["FedAvg-LoRA"], 0) == []


def test_shipped_grid_is_valid_for_every_method():
    ns = compare.parse_args(["--out", "/tmp/x", "--tune", str(ROOT / "config" / "tuning" / "grid.yaml"),
                             "--set", "validation_fraction=0.1"])
    grids = compare._check_tuning(ns, list(compare.METHODS))
    assert set(grids) == set(compare.METHODS) and all(len(points) >= 2 for points in grids.values())
    # a grid key that is no config key, or tuning without a validation split, stops before any run
    bad = compare.parse_args(["--out", "/tmp/x", "--tune", str(ROOT / "config" / "tuning" / "grid.yaml")])
    with pytest.raises(ConfigError, match="validation_fraction = 0.0"):
        compare._check_tuning(bad, ["FedAvg-LoRA"])


def _finished_run(folder: Path, ns, method: str, seed: int, setting, *, val: list[float], test: list[float]) -> None:
    """A run folder as the launcher leaves it after a successful run."""
    folder.mkdir(parents=True)
    requested = compare.run_overrides(ns, method, seed, setting)
    status = {"method": method, "seed": seed, "cf": ns.cf, "requested_overrides": requested, "status": "ok",
              "error": None, "wall_seconds": 1.0}
    (folder / "run.json").write_text(json.dumps(status))
    recs = [{"round": i, "wall_seconds": i + 1.0, "round_seconds": 1.0, "global_accuracy": t, "val_accuracy": v,
             "bytes_up": 1, "bytes_down": 1} for i, (v, t) in enumerate(zip(val, test))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    last3 = val[-3:]
    (folder / "summary.json").write_text(json.dumps({"val_accuracy_last3": sum(last3) / len(last3),
                                                     "final_accuracy": test[-1]}))


@pytest.fixture
def no_mpirun(monkeypatch):
    """Fail the test if the comparison would start a run."""
    def refuse(*a, **k):
        raise AssertionError(f"a run was started: {a[0] if a else k}")
    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_tuner_chooses_by_validation_never_by_test(tmp_path, no_mpirun):
    """Point A has the better test accuracy, point B the better validation accuracy: B is chosen."""
    grid = _grid(tmp_path, "FedAvg-LoRA:\n  learning_rate: [0.001, 0.005]\n")
    root = tmp_path / "cmp"
    argv = ["--out", str(root), "--methods", "FedAvg-LoRA", "--seeds", "2", "--tune", str(grid),
            "--set", "validation_fraction=0.1"]
    ns = compare.parse_args(argv)
    a, b = ["learning_rate=0.001"], ["learning_rate=0.005"]
    base = root / "tuning" / "FedAvg-LoRA"
    _finished_run(base / "learning_rate=0.001" / "seed0", ns, "FedAvg-LoRA", 0, a, val=[0.6, 0.6, 0.6],
                  test=[0.9, 0.9, 0.9])
    _finished_run(base / "learning_rate=0.005" / "seed0", ns, "FedAvg-LoRA", 0, b, val=[0.7, 0.7, 0.7],
                  test=[0.5, 0.5, 0.5])
    _finished_run(base / "learning_rate=0.005" / "seed1", ns, "FedAvg-LoRA", 1, b, val=[0.7, 0.7, 0.7],
                  test=[0.55, 0.55, 0.55])
    assert compare.main(argv) == 0  # everything finished before: nothing runs (Popen would fail the test)
    choices = json.loads((root / "tuning" / "choices.json").read_text())
    assert choices["FedAvg-LoRA"]["setting"] == b and choices["FedAvg-LoRA"]["score"] == pytest.approx(0.7)
    assert (root / "FedAvg-LoRA").resolve() == (base / "learning_rate=0.005").resolve()
    md = (root / "compare.md").read_text()
    assert "| FedAvg-LoRA | **learning_rate=0.005** | 0.7000 | 0.5000 |" in md
    assert "| FedAvg-LoRA | learning_rate=0.001 | 0.6000 | 0.9000 |" in md
    assert "edge of its range" in md and "FedAvg-LoRA: learning_rate=0.005 (the highest tried)" in md
    rows = (root / "compare.csv").read_text()
    assert "learning_rate=0.005" in rows and "0.525" in rows  # the chosen point's two seeds: (0.5 + 0.55) / 2
    sittings = json.loads((root / "comparison.json").read_text())["sittings"]
    assert len(sittings) == 1 and sittings[0]["runs"] == 0


def test_resume_skips_finished_runs_and_reruns_changed_ones(tmp_path, monkeypatch):
    root = tmp_path / "cmp"
    argv = ["--out", str(root), "--methods", "FedAvg-LoRA,FFA-LoRA", "--seeds", "1", "--set", "comm_round=3"]
    ns = compare.parse_args(argv)
    _finished_run(root / "FedAvg-LoRA" / "seed0", ns, "FedAvg-LoRA", 0, [], val=[0.5] * 3, test=[0.6] * 3)
    # FFA-LoRA's folder finished under other overrides: it must run again
    other = compare.parse_args(argv[:-1] + ["comm_round=2"])
    _finished_run(root / "FFA-LoRA" / "seed0", other, "FFA-LoRA", 0, [], val=[0.5] * 3, test=[0.6] * 3)
    started = []

    def fake_launch(method, seed, ns_, root_, progress, setting=(), out=None):
        started.append((method, seed))
        return {"status": "failed", "error": "not run in this test", "wall_seconds": 0.0}
    monkeypatch.setattr(compare, "launch", fake_launch)
    compare.main(argv)
    assert started == [("FFA-LoRA", 0)]
    assert compare.finished(root / "FedAvg-LoRA" / "seed0", None, compare.run_overrides(ns, "FedAvg-LoRA", 0))
    # a run whose files are gone is not finished, whatever its status says
    (root / "FedAvg-LoRA" / "seed0" / "summary.json").unlink()
    assert compare.finished(root / "FedAvg-LoRA" / "seed0", None, compare.run_overrides(ns, "FedAvg-LoRA", 0)) is None


def test_a_finished_run_is_kept_when_asked_for_in_other_words(tmp_path):
    """The same config spelt otherwise (a default written out, another worker count) is the same run; a
    config that differs in one value that changes the computation is not."""
    from fedml_fibec.config import dump_yaml, load_config

    ns = compare.parse_args(["--out", str(tmp_path), "--set", "comm_round=3"])
    folder = tmp_path / "FedAvg-LoRA" / "seed0"
    _finished_run(folder, ns, "FedAvg-LoRA", 0, [], val=[0.5] * 3, test=[0.6] * 3)
    made = compare.run_overrides(ns, "FedAvg-LoRA", 0)
    (folder / "config.yaml").write_text(dump_yaml(load_config(None, [*made, "worker_num=2"])))
    default_lr = load_config(None).train_args.learning_rate
    assert compare.finished(folder, None, compare.run_overrides(ns, "FedAvg-LoRA", 0, [f"learning_rate={default_lr}"]))
    assert compare.finished(folder, None, compare.run_overrides(ns, "FedAvg-LoRA", 0, ["worker_num=5"]))
    assert compare.finished(folder, None, compare.run_overrides(ns, "FedAvg-LoRA", 0, ["learning_rate=0.001"])) is None
    assert compare.finished(folder, None, compare.run_overrides(ns, "FedAvg-LoRA", 1)) is None  # another seed
    # a config saved before the evaluation keys (and flush_denormal) existed is the full run they default
    # to, not a tuning run
    older = yaml.safe_load(dump_yaml(load_config(None, made)))
    for key in ("eval_test_set", "eval_only_last"):
        del older["validation_args"][key]
    del older["device_args"]["flush_denormal"]
    (folder / "config.yaml").write_text(yaml.safe_dump(older))
    assert compare.finished(folder, None, compare.run_overrides(ns, "FedAvg-LoRA", 0, ["worker_num=5"]))
    assert compare.finished(folder, None, compare.run_overrides(ns, "FedAvg-LoRA", 0,
                                                                 list(compare.TUNING_RUN_OVERRIDES))) is None
    assert compare.finished(folder, None, compare.run_overrides(ns, "FedAvg-LoRA", 0,
                                                                 ["flush_denormal=true"])) is None
    (folder / "config.yaml").write_text("- not a config\n")
    assert compare.finished(folder, None, compare.run_overrides(ns, "FedAvg-LoRA", 0, ["worker_num=5"])) is None


def test_a_partly_run_grid_is_reported_as_provisional_and_runs_are_counted_once(tmp_path, no_mpirun):
    """One of two grid points has run: the report names the best so far as not final and counts each
    finished run once, though <out>/<method> links to the chosen point's folder."""
    grid = _grid(tmp_path, "FedAvg-LoRA:\n  learning_rate: [0.001, 0.005]\n")
    root = tmp_path / "cmp"
    argv = ["--out", str(root), "--methods", "FedAvg-LoRA", "--seeds", "1", "--tune", str(grid),
            "--set", "validation_fraction=0.1", "--report-only"]
    ns = compare.parse_args(argv)
    _finished_run(root / "tuning" / "FedAvg-LoRA" / "learning_rate=0.005" / "seed0", ns, "FedAvg-LoRA", 0,
                  ["learning_rate=0.005"], val=[0.7] * 3, test=[0.6] * 3)
    assert compare.main(argv) == 0
    choice = json.loads((root / "tuning" / "choices.json").read_text())["FedAvg-LoRA"]
    assert (choice["points_run"], choice["points_total"]) == (1, 2)
    md = (root / "compare.md").read_text()
    assert "Tuning not finished (grid points with a validation score / grid points): FedAvg-LoRA 1/2." in md
    assert "| FedAvg-LoRA (tuning 1/2 points, not final) |" in md
    assert "1 finished run(s) took 00:00:01 together" in md and "in the sittings of this command" not in md
    assert compare.runs_wall_seconds(root) == (1.0, 1)
    # with the whole grid run, the choice is final and unmarked
    _finished_run(root / "tuning" / "FedAvg-LoRA" / "learning_rate=0.001" / "seed0", ns, "FedAvg-LoRA", 0,
                  ["learning_rate=0.001"], val=[0.5] * 3, test=[0.9] * 3)
    assert compare.main(argv) == 0
    md = (root / "compare.md").read_text()
    assert "Tuning not finished" not in md and "| FedAvg-LoRA |" in md and "not final" not in md


def test_grid_points_run_as_tuning_runs_and_the_chosen_point_runs_every_seed_in_full(tmp_path, monkeypatch):
    """A point without a full run at the tuning seed gets a tuning run (validation only, last three evaluation
    rounds) in validation-seed0; a point with one is read, not run again. The chosen point's seeds, the tuning
    seed among them, then run in full in seed<s>; a second sitting runs nothing."""
    grid = _grid(tmp_path, "FedAvg-LoRA:\n  learning_rate: [0.001, 0.005]\n")
    root = tmp_path / "cmp"
    argv = ["--out", str(root), "--methods", "FedAvg-LoRA", "--seeds", "2", "--tune", str(grid),
            "--set", "validation_fraction=0.1"]
    ns = compare.parse_args(argv)
    base = root / "tuning" / "FedAvg-LoRA"
    _finished_run(base / "learning_rate=0.001" / "seed0", ns, "FedAvg-LoRA", 0, ["learning_rate=0.001"],
                  val=[0.6] * 3, test=[0.9] * 3)
    started = []

    def fake_launch(method, seed, ns_, root_, progress, setting=(), out=None):
        started.append((out.relative_to(base).as_posix(), list(setting)))
        _finished_run(out, ns_, method, seed, setting, val=[0.8] * 3, test=[0.7] * 3)
        return {"status": "ok", "error": None, "wall_seconds": 1.0}
    monkeypatch.setattr(compare, "launch", fake_launch)
    assert compare.main(argv) == 0
    assert started == [("learning_rate=0.005/validation-seed0", ["learning_rate=0.005", *compare.TUNING_RUN_OVERRIDES]),
                       ("learning_rate=0.005/seed0", ["learning_rate=0.005"]),
                       ("learning_rate=0.005/seed1", ["learning_rate=0.005"])]
    choice = json.loads((root / "tuning" / "choices.json").read_text())["FedAvg-LoRA"]
    assert choice["setting"] == ["learning_rate=0.005"] and choice["points_run"] == 2
    started.clear()
    assert compare.main(argv) == 0 and started == []


def _choices(folder: Path, choices: dict) -> Path:
    (folder / "tuning").mkdir(parents=True)
    (folder / "tuning" / "choices.json").write_text(json.dumps(choices))
    return folder


def _choice(setting, run=2, total=2) -> dict:
    return {"setting": setting, "slug": ",".join(setting or []), "score": 0.7, "points_run": run, "points_total": total,
            "points": [], "edges": []}


def test_settings_from_runs_each_method_at_its_chosen_setting_seed_by_seed_and_resumes(tmp_path, monkeypatch):
    """--settings-from reruns the chosen settings of another folder's tuning (no tuning runs), seed by seed
    across the methods (interleaved, as timings under one condition want), and a second sitting runs nothing."""
    source = _choices(tmp_path / "tuned", {"FedAvg-LoRA": _choice(["learning_rate=0.002"]),
                                           "FFA-LoRA": _choice(["learning_rate=0.005", "head_learning_rate=0.01"])})
    root = tmp_path / "timing"
    argv = ["--out", str(root), "--methods", "FedAvg-LoRA,FFA-LoRA", "--seeds", "2", "--settings-from", str(source)]
    started = []

    def fake_launch(method, seed, ns_, root_, progress, setting=(), out=None):
        out = out or root_ / method / f"seed{seed}"
        started.append((method, seed, list(setting), out.relative_to(root).as_posix()))
        shutil.rmtree(out, ignore_errors=True)  # the launcher reuses a folder; the fake writes a fresh one
        _finished_run(out, ns_, method, seed, setting, val=[0.8] * 3, test=[0.7] * 3)
        return {"status": "ok", "error": None, "wall_seconds": 1.0}
    monkeypatch.setattr(compare, "launch", fake_launch)
    assert compare.main(argv) == 0
    ffa = ["learning_rate=0.005", "head_learning_rate=0.01"]
    assert started == [("FedAvg-LoRA", 0, ["learning_rate=0.002"], "FedAvg-LoRA/seed0"),
                       ("FFA-LoRA", 0, ffa, "FFA-LoRA/seed0"),
                       ("FedAvg-LoRA", 1, ["learning_rate=0.002"], "FedAvg-LoRA/seed1"),
                       ("FFA-LoRA", 1, ffa, "FFA-LoRA/seed1")]
    assert not (root / "tuning").exists()
    md = (root / "compare.md").read_text()
    assert (f"Settings chosen by the tuning in `{source}` (not tuned here): FedAvg-LoRA learning_rate=0.002; "
            "FFA-LoRA learning_rate=0.005 head_learning_rate=0.01.") in md
    started.clear()
    assert compare.main(argv) == 0 and started == []
    # a run folder made at another setting is not the chosen setting's run: it runs again
    _choices(tmp_path / "retuned", {"FedAvg-LoRA": _choice(["learning_rate=0.005"]), "FFA-LoRA": _choice(ffa)})
    assert compare.main(argv[:-1] + [str(tmp_path / "retuned")]) == 0
    assert [(m, s) for m, s, *_ in started] == [("FedAvg-LoRA", 0), ("FedAvg-LoRA", 1)]


@pytest.mark.parametrize("case, message", [
    ("missing", "no {path} (expected the --out folder of a comparison run with --tune)"),
    ("no choice", "has no chosen setting for FFA-LoRA (tuned there: FedAvg-LoRA)"),
    ("unfinished", "FedAvg-LoRA's tuning in {path} is not finished (1/3 grid points run)"),
    ("not a mapping", "{path} is not a method -> choice mapping"),
    ("with tune", "argument --tune: not allowed with argument --settings-from"),
    ("bad value", "FedAvg-LoRA at learning_rate=-1"),
])
def test_settings_from_refuses_what_is_not_a_final_choice_before_any_run(tmp_path, capsys, no_mpirun, case, message):
    source = tmp_path / "tuned"
    if case == "not a mapping":
        _choices(source, [])
    elif case != "missing":
        _choices(source, {"FedAvg-LoRA": _choice(["learning_rate=-1" if case == "bad value" else "learning_rate=0.002"],
                                                 run=1 if case == "unfinished" else 3, total=3),
                          "FFA-LoRA": _choice(None) if case == "no choice" else _choice(["learning_rate=0.005"])})
    argv = ["--out", str(tmp_path / "timing"), "--methods", "FedAvg-LoRA,FFA-LoRA", "--settings-from", str(source)]
    if case == "with tune":
        argv += ["--tune", str(_grid(tmp_path, "FedAvg-LoRA:\n  learning_rate: [0.001]\n"))]
    if case == "with tune":  # refused by the command line itself
        with pytest.raises(SystemExit) as exit_:
            compare.main(argv)
        assert exit_.value.code == 2
    else:
        assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(path=source / "tuning" / "choices.json") in err
    assert case == "with tune" or f"compare_baselines: --settings-from {source}: " in err
    assert not (tmp_path / "timing").exists()
