"""The comparison report from synthetic run folders (no MPI): numbers in CSV/Markdown, valid PNGs."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from fedml_fibec.report.compare import markdown_table
from fedml_fibec.report import compare_rows, load_runs, plot_curves, target_accuracy, write_csv, write_markdown


def write_run(root: Path, method: str, seed: int, accs, *, up=1_000_000, down=2_000_000, secs=10.0,
              device=None, failed: str | None = None, server_eval=None) -> None:
    folder = root / method / f"seed{seed}"
    folder.mkdir(parents=True)
    status = {"method": method, "seed": seed, "status": "failed" if failed else "ok", "error": failed}
    (folder / "run.json").write_text(json.dumps(status))
    if failed:
        return
    lines = []
    for i, a in enumerate(accs):
        lines.append(json.dumps({"round": i, "method": method, "wall_seconds": secs * (i + 1), "round_seconds": secs,
                                 "global_accuracy": a, "device_accuracy": device, "bytes_up": up,
                                 "bytes_down": down,
                                 **({} if server_eval is None else {"server_eval_seconds": server_eval})}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps({"method": method, "rounds": len(accs)}))


@pytest.fixture
def comparison(tmp_path):
    root = tmp_path / "cmp"
    write_run(root, "FedAvg-LoRA", 0, [0.5, 0.7, 0.8], device=0.6)
    write_run(root, "FedAvg-LoRA", 1, [0.5, 0.6, 0.6], device=0.7)
    write_run(root, "FibecFed", 0, [0.6, 0.7, 0.75], up=250_000, secs=5.0, device=0.8)
    write_run(root, "FibecFed", 1, [0.6, 0.68, 0.7], up=250_000, secs=7.0, device=0.9)
    write_run(root, "FedML-FedNova", 0, [], failed="exit code 1: boom")
    return root


def test_rows_means_spreads_and_target(comparison):
    runs = load_runs(comparison, ["FedAvg-LoRA", "FibecFed", "FedML-FedNova"])
    target, note = target_accuracy(runs)
    assert target == pytest.approx(0.95 * (0.8 + 0.6) / 2)  # 0.665
    assert "FedAvg-LoRA" in note
    rows = {r["method"]: r for r in compare_rows(runs, target)}
    fa, fb, nova = rows["FedAvg-LoRA"], rows["FibecFed"], rows["FedML-FedNova"]
    # final accuracy: the mean of the last three evaluated rounds, then mean and sd over seeds
    assert fa["final_acc_mean"] == pytest.approx((2.0 / 3 + 1.7 / 3) / 2)
    assert fa["final_acc_std"] == pytest.approx(statistics.stdev([2.0 / 3, 1.7 / 3]))
    assert fa["best_acc_mean"] == pytest.approx(0.7)
    assert fa["device_acc_mean"] == pytest.approx(0.65)
    # FedAvg-LoRA reaches 0.665 at round 2 (seed 0, 20 s) and never with seed 1 (best 0.6).
    assert fa["target_reached"] == "1/2"
    assert fa["rounds_to_target_mean"] == pytest.approx(2) and fa["rounds_to_target_std"] is None
    assert fa["seconds_to_target_mean"] == pytest.approx(20.0)
    # FibecFed: round 2 in both seeds, at 10 s and 14 s.
    assert fb["target_reached"] == "2/2"
    assert fb["rounds_to_target_mean"] == pytest.approx(2)
    assert fb["seconds_to_target_mean"] == pytest.approx(12.0)
    assert fb["seconds_to_target_std"] == pytest.approx(statistics.stdev([10.0, 14.0]))
    assert fb["mb_up_mean"] == pytest.approx(0.75) and fb["mb_down_mean"] == pytest.approx(6.0)
    assert fb["sec_per_round_mean"] == pytest.approx(6.0)
    assert nova["status"] == "failed" and "boom" in nova["error"]


def test_seconds_to_target_without_the_servers_evaluation(tmp_path):
    """The server's evaluations up to and including the target round are left out; the wall seconds stay."""
    root = tmp_path / "cmp"
    write_run(root, "FedAvg-LoRA", 0, [0.5, 0.7, 0.8], secs=10.0, server_eval=4.0)
    write_run(root, "FibecFed", 0, [0.6, 0.7, 0.75], secs=5.0)  # an older run: no server_eval_seconds
    rows = {r["method"]: r for r in compare_rows(load_runs(root, ["FedAvg-LoRA", "FibecFed"]), 0.7)}
    fa, fb = rows["FedAvg-LoRA"], rows["FibecFed"]
    assert fa["seconds_to_target_mean"] == pytest.approx(20.0)  # round 2 at 2 x 10 s
    assert fa["train_seconds_to_target_mean"] == pytest.approx(20.0 - 2 * 4.0)
    assert fb["seconds_to_target_mean"] == pytest.approx(10.0) and fb["train_seconds_to_target_mean"] is None
    table = markdown_table(list(rows.values()), 0.7, "given")
    assert "s to target w/o eval" in table and "| 20 | 12 |" in table and "| 10 | - |" in table


def test_absolute_target_and_missing_reference(comparison):
    runs = load_runs(comparison, ["FibecFed"])
    assert target_accuracy(runs, absolute=0.7)[0] == 0.7
    target, note = target_accuracy(runs)
    assert target is None and "no successful run" in note
    assert compare_rows(runs, None)[0]["target_reached"] is None


def test_csv_markdown_and_plots(comparison):
    runs = load_runs(comparison, ["FedAvg-LoRA", "FibecFed", "FedML-FedNova"])
    target, note = target_accuracy(runs)
    rows = compare_rows(runs, target)
    write_csv(rows, comparison / "compare.csv")
    write_markdown(rows, comparison / "compare.md", target, note, "# header")
    table = {r["method"]: r for r in csv.DictReader(open(comparison / "compare.csv"))}
    assert float(table["FibecFed"]["final_acc_mean"]) == pytest.approx((2.05 / 3 + 1.98 / 3) / 2)
    assert table["FedML-FedNova"]["status"] == "failed" and table["FedML-FedNova"]["final_acc_mean"] == ""
    md = (comparison / "compare.md").read_text()
    assert md.startswith("# header")
    assert "| FibecFed | 0.6717 ± 0.0165 | 0.7250 ± 0.0354 | - | - | 0.8500 ± 0.0707 | 2.0 ± 0.0 (2/2) | 12 ± 3 | - |" in md
    assert "**failed**: seed 0: exit code 1: boom" in md
    assert "0.6650" in md
    for path in plot_curves(runs, comparison, target):
        with Image.open(path) as img:
            img.verify()
            assert img.format == "PNG"
    assert sorted(p.name for p in comparison.glob("*.png")) == [
        "accuracy_vs_mb_up.png", "accuracy_vs_round.png", "accuracy_vs_seconds.png"]


def test_line_styles_tell_twenty_methods_apart():
    from fedml_fibec.report.plots import line_styles

    styles = line_styles(20)
    assert len({s["color"] for s in styles}) == 20  # tab10 would repeat after ten methods
    assert len({(s["color"], s["linestyle"], s["marker"]) for s in styles}) == 20


def test_report_only_keeps_the_command_that_made_the_runs(comparison):
    from fedml_fibec import compare

    made = ["--out", str(comparison), "--methods", "FedAvg-LoRA,FibecFed", "--seeds", "2"]
    (comparison / "comparison.json").write_text(json.dumps({"argv": made, "wall_seconds": 3725.0}))
    assert compare.main(["--out", str(comparison), "--methods", "FedAvg-LoRA,FibecFed", "--seeds", "2",
                         "--report-only"]) == 0
    md = (comparison / "compare.md").read_text()
    assert "--report-only" not in md
    assert "compare_baselines.py --out" in md and "total wall time 01:02:05" in md
    rows = {r["method"]: r for r in csv.DictReader(open(comparison / "compare.csv"))}
    assert set(rows) == {"FedAvg-LoRA", "FibecFed"}


def test_validation_compute_and_majority_columns(tmp_path):
    root = tmp_path / "cmp"
    write_run(root, "FFA-LoRA", 0, [0.578, 0.578, 0.578, 0.58])
    write_run(root, "FedAvg-LoRA", 0, [0.6, 0.7, 0.8, 0.82])
    for method in ("FFA-LoRA", "FedAvg-LoRA"):  # what the engines add: test majority share, val acc, device clocks
        folder = root / method / "seed0"
        (folder / "summary.json").write_text(json.dumps({"test_majority_share": 0.578}))
        recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        for i, r in enumerate(recs):
            r.update(val_accuracy=0.5 + 0.1 * i, num_devices=2, train_seconds=3.0, scoring_seconds=1.0)
            if method == "FedAvg-LoRA":  # a run that recorded CPU seconds; FFA-LoRA's predates them
                r.update(train_cpu_seconds=2.0, scoring_cpu_seconds=0.5)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = {r["method"]: r for r in compare_rows(load_runs(root, ["FFA-LoRA", "FedAvg-LoRA"]), None)}
    ffa, avg = rows["FFA-LoRA"], rows["FedAvg-LoRA"]
    assert ffa["at_majority"] and not avg["at_majority"]
    assert avg["val_acc_mean"] == pytest.approx((0.6 + 0.7 + 0.8) / 3)  # last three evaluated rounds
    assert avg["compute_s_mean"] == pytest.approx(4 * 2 * (3.0 + 1.0))
    assert avg["compute_cpu_s_mean"] == pytest.approx(4 * 2 * (2.0 + 0.5)) and ffa["compute_cpu_s_mean"] is None
    assert (avg["compute_cpu_s_seeds"], ffa["compute_cpu_s_seeds"]) == (1, 0)
    write_markdown(list(rows.values()), root / "compare.md", None, "none", "")
    assert "| FFA-LoRA (majority class) |" in (root / "compare.md").read_text()
    # a mean over fewer seeds than the method ran says so
    from fedml_fibec.report.compare import markdown_table

    partial = dict(avg, seeds_ok=3, seeds=3, compute_cpu_s_seeds=2)
    assert f"| {avg['compute_cpu_s_mean']:.0f} (2/3 seeds) |" in markdown_table([partial], None, "none")
    assert "seeds) |" not in markdown_table([avg], None, "none")


def test_collect_variants_labels_runs_of_several_comparisons_and_keeps_their_files(tmp_path):
    """Variants of one method from separate comparison folders: one row each, target from the reference."""
    import subprocess
    import sys

    write_run(tmp_path / "a", "FedAvg-LoRA", 0, [0.5, 0.8, 0.8])
    write_run(tmp_path / "b", "FibecFed", 0, [0.6, 0.7, 0.76], up=250_000, secs=5.0)
    write_run(tmp_path / "c", "FibecFed", 0, [0.5, 0.5, 0.5])
    out = tmp_path / "table"
    script = Path(__file__).resolve().parent.parent / "run_scripts" / "collect_variants.py"
    cmd = [sys.executable, str(script), "--out", str(out), "--run", f"FedAvg-LoRA={tmp_path / 'a' / 'FedAvg-LoRA'}",
           "--run", f"scored GAL={tmp_path / 'b' / 'FibecFed'}", "--run", f"suffix GAL={tmp_path / 'c' / 'FibecFed'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in csv.DictReader((out / "compare.csv").open())}
    assert list(rows) == ["FedAvg-LoRA", "scored GAL", "suffix GAL"]
    assert float(rows["scored GAL"]["final_acc_mean"]) == pytest.approx((0.6 + 0.7 + 0.76) / 3)
    assert float(rows["scored GAL"]["mb_up_mean"]) == pytest.approx(0.75)
    # target 0.95 * 0.8 = 0.76: the scored variant reaches it at its third round, the other never
    assert rows["scored GAL"]["rounds_to_target_mean"] == "3.0" and rows["suffix GAL"]["target_reached"] == "0/1"
    assert (out / "scored_GAL" / "seed0" / "metrics.jsonl").read_text() == (
        tmp_path / "b" / "FibecFed" / "seed0" / "metrics.jsonl").read_text()
    bad = subprocess.run([sys.executable, str(script), "--out", str(out), "--run", f"x={tmp_path / 'none'}"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no seed*/metrics.jsonl under" in bad.stderr


def test_method_ranks_order_means_share_ties_and_skip_missing():
    from fedml_fibec.report.compare import method_ranks, ranks_markdown

    rows = [
        {"method": "A", "final_acc_mean": 0.80, "seconds_to_target_mean": 100.0, "mb_up_mean": 30.0},
        {"method": "B", "final_acc_mean": 0.85, "seconds_to_target_mean": None, "mb_up_mean": 60.0},
        {"method": "C", "final_acc_mean": 0.80, "seconds_to_target_mean": 50.0, "mb_up_mean": 30.0},
        {"method": "D", "final_acc_mean": 0.70, "seconds_to_target_mean": 200.0, "mb_up_mean": 10.0},
    ]
    ranks = method_ranks(rows)
    assert [ranks[m]["final acc"] for m in "ABCD"] == [2, 1, 2, 4]  # higher is better; ties share a rank
    assert [ranks[m]["s to target"] for m in "ABCD"] == [2, None, 1, 3]  # B never reached the target
    assert [ranks[m]["MB up"] for m in "ABCD"] == [2, 4, 2, 1]
    md = ranks_markdown(rows)
    assert "| method | final acc (of 4) | s to target (of 3) | MB up (of 4) |" in md
    assert "| B | 1 | - | 4 |" in md


def test_a_method_without_runs_is_not_run_not_failed(comparison):
    """A method with no seed folder yet (a tuned method whose new best point has no seeds) is not a failure."""
    runs = load_runs(comparison, ["FibecFed", "FedML-FedNova", "FFA-LoRA"])  # FFA-LoRA: no folder at all
    rows = {r["method"]: r for r in compare_rows(runs, 0.7)}
    assert rows["FFA-LoRA"]["status"] == "not run" and rows["FFA-LoRA"]["final_acc_mean"] is None
    assert rows["FedML-FedNova"]["status"] == "failed"  # a run that failed stays a failure
    table = markdown_table(list(rows.values()), 0.7, "given")
    assert "| FFA-LoRA | not run yet |" in table
    assert "FFA-LoRA | **failed**" not in table and "| FedML-FedNova | **failed**: seed 0: exit code 1: boom" in table


def _reference_seed_ranks(runs, target):
    """Slow and obvious: per seed, sort the reaching runs' seconds; a rank is where a time first appears
    in that sorted list (ties share it); misses come after every reaching run."""
    out = {}
    for seed in sorted({r.seed for r in runs if r.ok}):
        mine = [r for r in runs if r.ok and r.seed == seed]
        times = sorted(r.reach(target)[1] for r in mine if r.reach(target) is not None)
        for r in mine:
            hit = r.reach(target)
            out[(r.method, seed)] = times.index(hit[1]) + 1 if hit else len(times) + 1
    return out


def test_seed_ranks_rank_within_each_seed_with_ties_and_misses_last(tmp_path):
    """Seconds-to-target ranks are taken within each seed (a seed's runs share one machine's condition):
    ties share a rank, a run that never reaches the target comes after every run of its seed that did, and
    a seed without a successful run of a method gives it no rank there."""
    from fedml_fibec.report.compare import seed_ranks, seed_ranks_markdown

    root = tmp_path / "cmp"
    write_run(root, "A", 0, [0.5, 0.8], secs=10.0)       # reaches 0.7 at 20 s
    write_run(root, "B", 0, [0.5, 0.6, 0.9], secs=5.0)   # 15 s
    write_run(root, "C", 0, [0.5, 0.75], secs=7.5)       # 15 s: ties with B
    write_run(root, "D", 0, [0.5, 0.6], secs=1.0)        # never: last, whatever its speed
    write_run(root, "A", 1, [0.9], secs=10.0)            # 10 s (a slower machine would scale every run of seed 1)
    write_run(root, "B", 1, [0.1, 0.2, 0.71], secs=10.0)  # 30 s
    write_run(root, "C", 1, [0.6, 0.6], secs=1.0)        # never
    write_run(root, "D", 1, [], failed="exit code 1")    # no rank at seed 1
    runs = load_runs(root, ["A", "B", "C", "D"])
    ranks = seed_ranks(runs, 0.7)
    assert ranks == {"A": {0: 3, 1: 1}, "B": {0: 1, 1: 2}, "C": {0: 1, 1: 3}, "D": {0: 4, 1: None}}
    reference = _reference_seed_ranks(runs, 0.7)
    assert {(m, s): r for m, by_seed in ranks.items() for s, r in by_seed.items() if r is not None} == reference
    md = seed_ranks_markdown(runs, 0.7)
    assert "| method | seed 0 (of 4) | seed 1 (of 3) | mean rank |" in md
    assert "| C | 1 | 3 (missed) | 2.0 ± 1.4 |" in md and "| D | 4 (missed) | - | 4.0 |" in md
    assert seed_ranks(runs, None) == {"A": {}, "B": {}, "C": {}, "D": {}}

    # compare.md carries the table with two seeds or more, and leaves it out with one (the rank table says it).
    rows = compare_rows(runs, 0.7)
    write_markdown(rows, tmp_path / "two.md", 0.7, "given", runs=runs)
    assert "## Seconds to target, ranked within each seed" in (tmp_path / "two.md").read_text()
    seed0 = [r for r in runs if r.seed == 0]
    write_markdown(compare_rows(seed0, 0.7), tmp_path / "one.md", 0.7, "given", runs=seed0)
    assert "ranked within each seed" not in (tmp_path / "one.md").read_text()
