"""Per-method comparison rows (mean and spread over seeds) from run folders, as CSV and Markdown."""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..atomic import atomic_write_text
from ..metrics import FINAL_ROUNDS, mean_of_last_rounds, read_jsonl

STATUS_FILE = "run.json"  # written by the comparison launcher: method, seed, status, error


@dataclass
class RunResult:
    """One run (method, seed): its round records, or why it failed."""

    method: str
    seed: int
    records: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    error: Optional[str] = None
    not_run: bool = False  # a placeholder for a method with no run folder yet (its error says where)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.records)

    def accuracies(self) -> list[tuple[dict, float]]:
        """(record, global accuracy) of the rounds that were evaluated."""
        return [(r, r["global_accuracy"]) for r in self.records if r.get("global_accuracy") is not None]

    def final_accuracy(self) -> Optional[float]:
        """Mean test accuracy of the last FINAL_ROUNDS evaluated rounds (one round's accuracy swings)."""
        return mean_of_last_rounds([a for _, a in self.accuracies()])

    def personal_accuracy(self) -> Optional[float]:
        """Mean over the last FINAL_ROUNDS rounds of the devices' own models on their own held-out samples."""
        return mean_of_last_rounds([r["personal_accuracy"] for r in self.records if r.get("personal_accuracy") is not None])

    def validation_score(self) -> Optional[float]:
        """Mean validation accuracy of the last FINAL_ROUNDS evaluated rounds (runs with a validation split)."""
        return mean_of_last_rounds([r["val_accuracy"] for r in self.records if r.get("val_accuracy") is not None])

    def device_compute_seconds(self, cpu: bool = False) -> Optional[float]:
        """Local compute summed over devices and rounds: scoring and training (device evaluation, a
        measurement of the run, is left out). Wall seconds, or with `cpu` the CPU seconds of the threads
        that did it (None for runs made before they were recorded)."""
        total, seen = 0.0, False
        keys = ("scoring_cpu_seconds", "train_cpu_seconds") if cpu else ("scoring_seconds", "train_seconds")
        for r in self.records:
            for k in keys:
                if r.get(k) is not None:
                    total += r[k] * (r.get("num_devices") or 0)
                    seen = True
        return total if seen else None

    def best_accuracy(self) -> Optional[float]:
        acc = self.accuracies()
        return max(a for _, a in acc) if acc else None

    def final_device_accuracy(self) -> Optional[float]:
        dev = [r["device_accuracy"] for r in self.records if r.get("device_accuracy") is not None]
        return dev[-1] if dev else None

    def reach(self, target: float) -> Optional[tuple[int, float, Optional[float]]]:
        """(rounds, wall seconds, wall seconds less the server's evaluations up to then) at the first
        evaluation with accuracy >= target; None if never. The third is None for runs that did not
        record server_eval_seconds."""
        spent: Optional[float] = 0.0
        for r in self.records:
            if spent is not None:
                spent = None if r.get("server_eval_seconds") is None else spent + r["server_eval_seconds"]
            a = r.get("global_accuracy")
            if a is not None and a >= target:
                wall = float(r["wall_seconds"])
                return int(r["round"]) + 1, wall, None if spent is None else wall - spent
        return None

    def total_mb(self, key: str) -> float:
        return sum(r.get(key) or 0 for r in self.records) / 1e6

    def seconds_per_round(self) -> Optional[float]:
        secs = [r["round_seconds"] for r in self.records if r.get("round_seconds") is not None]
        return sum(secs) / len(secs) if secs else None


def _read_run(folder: Path, method: str, seed: int) -> RunResult:
    """A run folder -> RunResult; a missing or unreadable file becomes the run's error."""
    status = {}
    if (folder / STATUS_FILE).is_file():
        status = json.loads((folder / STATUS_FILE).read_text())
    run = RunResult(method=status.get("method", method), seed=int(status.get("seed", seed)))
    if status.get("status") == "failed":
        run.error = status.get("error") or "failed"
        return run
    try:
        run.records = read_jsonl(folder / "metrics.jsonl")
        run.summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        run.error = f"unreadable results: {exc}"
    if not run.records and run.error is None:
        run.error = "no round records"
    return run


def load_runs(root: str | Path, methods: Optional[Sequence[str]] = None) -> list[RunResult]:
    """Every <root>/<method>/seed<k>/ run (only `methods`, in that order, when given)."""
    root = Path(root)
    names = list(methods) if methods else sorted(p.name for p in root.iterdir() if p.is_dir())
    runs = []
    for name in names:
        folder = root / name
        seeds = sorted(folder.glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
        if not seeds:  # not run yet (e.g. a tuned method whose new best point has no seeds): not a failure
            runs.append(RunResult(method=name, seed=-1, error=f"no seed<k> run folder under {folder} yet",
                                  not_run=True))
        for s in seeds:
            runs.append(_read_run(s, name, int(s.name[4:]) if s.name[4:].isdigit() else -1))
    return runs


def _mean_spread(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (None with fewer than 2 values) of the non-None values."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def target_accuracy(runs: Sequence[RunResult], *, reference: Sequence[str] = ("FedAvg-LoRA", "FedML-FedAvg"),
                    fraction: float = 0.95, absolute: Optional[float] = None) -> tuple[Optional[float], str]:
    """The accuracy target and how it was set: `absolute`, or `fraction` of the reference's best accuracy.

    The reference is the first method of `reference` with a successful run; its best accuracy is the
    mean over its seeds of each seed's best global accuracy.
    """
    if absolute is not None:
        return float(absolute), f"accuracy {absolute:.4f} (given)"
    for name in reference:
        bests = [r.best_accuracy() for r in runs if r.method == name and r.ok]
        mean, _ = _mean_spread(bests)
        if mean is not None:
            return fraction * mean, f"{fraction:.0%} of the best {name} accuracy ({mean:.4f})"
    return None, f"none: no successful run of {' or '.join(reference)}"


COLUMNS = (
    "method", "status", "seeds_ok", "seeds",
    "final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std", "device_acc_mean", "device_acc_std",
    "val_acc_mean", "val_acc_std", "personal_acc_mean", "personal_acc_std", "compute_s_mean", "compute_s_std", "compute_cpu_s_mean", "compute_cpu_s_std", "compute_cpu_s_seeds", "majority_share", "at_majority",
    "target_reached", "rounds_to_target_mean", "rounds_to_target_std",
    "seconds_to_target_mean", "seconds_to_target_std", "train_seconds_to_target_mean", "train_seconds_to_target_std",
    "mb_up_mean", "mb_up_std", "mb_down_mean", "mb_down_std", "sec_per_round_mean", "sec_per_round_std",
    "tuned_setting", "validation_score", "tuning_points", "error",
)


def compare_rows(runs: Sequence[RunResult], target: Optional[float]) -> list[dict[str, Any]]:
    """One row per method, in first-seen order: means and spreads over its successful seeds."""
    methods = list(dict.fromkeys(r.method for r in runs))
    rows = []
    for name in methods:
        mine = [r for r in runs if r.method == name]
        good = [r for r in mine if r.ok]
        errors = [f"seed {r.seed}: {r.error}" for r in mine if not r.ok]
        row: dict[str, Any] = {"method": name, "seeds_ok": len(good), "seeds": len(mine),
                               "status": ("not run" if all(r.not_run for r in mine) else "ok" if len(good) == len(mine)
                                          else "failed" if not good else "partial"),
                               "error": " | ".join(errors) or None}
        for key, values in (
            ("final_acc", [r.final_accuracy() for r in good]),
            ("best_acc", [r.best_accuracy() for r in good]),
            ("device_acc", [r.final_device_accuracy() for r in good]),
            ("mb_up", [r.total_mb("bytes_up") for r in good]),
            ("mb_down", [r.total_mb("bytes_down") for r in good]),
            ("sec_per_round", [r.seconds_per_round() for r in good]),
            ("val_acc", [r.validation_score() for r in good]),
            ("personal_acc", [r.personal_accuracy() for r in good]),
            ("compute_s", [r.device_compute_seconds() for r in good]),
            ("compute_cpu_s", [r.device_compute_seconds(cpu=True) for r in good]),
        ):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_spread(values)
            row[f"{key}_seeds"] = sum(v is not None for v in values)  # seeds behind the mean
        shares = [r.summary.get("test_majority_share") for r in good if r.summary.get("test_majority_share")]
        row["majority_share"] = shares[0] if shares else None
        # At the majority class: even its best round is within half a point of always answering that class.
        row["at_majority"] = (row["majority_share"] is not None and row["best_acc_mean"] is not None
                              and row["best_acc_mean"] <= row["majority_share"] + 0.005)
        reached = [r.reach(target) for r in good] if target is not None else []
        hits = [x for x in reached if x is not None]
        row["target_reached"] = f"{len(hits)}/{len(good)}" if target is not None else None
        # Rounds and seconds to target are averaged over the seeds that reached it.
        row["rounds_to_target_mean"], row["rounds_to_target_std"] = _mean_spread([h[0] for h in hits])
        row["seconds_to_target_mean"], row["seconds_to_target_std"] = _mean_spread([h[1] for h in hits])
        without_eval = [h[2] for h in hits]
        row["train_seconds_to_target_mean"], row["train_seconds_to_target_std"] = (
            _mean_spread(without_eval) if hits and None not in without_eval else (None, None))
        rows.append(row)
    return rows


def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    """compare.csv: one line per method, every COLUMNS field (empty = not available)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _pm(mean: Optional[float], std: Optional[float], spec: str) -> str:
    if mean is None:
        return "-"
    return format(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")


def _of_seeds(row: dict, key: str) -> str:
    """' (k/n seeds)' when only some of a method's seeds have this value (e.g. runs made before it was
    recorded), so a mean over fewer seeds says so."""
    k, n = row.get(f"{key}_seeds"), row.get("seeds_ok")
    return f" ({k}/{n} seeds)" if k and n and k < n else ""


def markdown_table(rows: Sequence[dict], target: Optional[float], target_note: str) -> str:
    """The comparison as a Markdown table with a short legend."""
    lines = [
        "| method | final acc | best acc | val acc | personal acc | device acc | rounds to target | s to target "
        "| s to target w/o eval | device compute s | device CPU s | MB up | MB down | s/round | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] == "not run":
            lines.append(f"| {r['method']} | not run yet | | | | | | | | | | | | | 0 |")
            continue
        if r["status"] == "failed":
            err = (r["error"] or "").replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['method']} | **failed**: {err[:300]} | | | | | | | | | | | | | 0/{r['seeds']} |")
            continue
        reached = r["target_reached"] or "-"
        mark = " (majority class)" if r.get("at_majority") else ""
        if r.get("tuning_incomplete"):
            mark += f" (tuning {r['tuning_points']} points, not final)"
        lines.append(
            f"| {r['method']}{mark} | {_pm(r['final_acc_mean'], r['final_acc_std'], '.4f')} "
            f"| {_pm(r['best_acc_mean'], r['best_acc_std'], '.4f')} "
            f"| {_pm(r.get('val_acc_mean'), r.get('val_acc_std'), '.4f')} "
            f"| {_pm(r.get('personal_acc_mean'), r.get('personal_acc_std'), '.4f')} "
            f"| {_pm(r['device_acc_mean'], r['device_acc_std'], '.4f')} "
            f"| {_pm(r['rounds_to_target_mean'], r['rounds_to_target_std'], '.1f')} ({reached}) "
            f"| {_pm(r['seconds_to_target_mean'], r['seconds_to_target_std'], '.0f')} "
            f"| {_pm(r.get('train_seconds_to_target_mean'), r.get('train_seconds_to_target_std'), '.0f')} "
            f"| {_pm(r.get('compute_s_mean'), r.get('compute_s_std'), '.0f')} "
            f"| {_pm(r.get('compute_cpu_s_mean'), r.get('compute_cpu_s_std'), '.0f')}{_of_seeds(r, 'compute_cpu_s')} "
            f"| {_pm(r['mb_up_mean'], r['mb_up_std'], '.2f')} | {_pm(r['mb_down_mean'], r['mb_down_std'], '.2f')} "
            f"| {_pm(r['sec_per_round_mean'], r['sec_per_round_std'], '.1f')} | {r['seeds_ok']}/{r['seeds']} |")
    legend = [
        "",
        f"Target: {target_note}" + ("" if target is None else f" = {target:.4f}") + ". Rounds and seconds to "
        "target average the seeds that reached it (reached/successful seeds in brackets). s to target is wall "
        "time; w/o eval leaves out the server's evaluations of the global model (the same work for every "
        "method; - for runs that did not time them).",
        "Values are mean ± sample standard deviation over seeds (no ± with one seed). Final acc is the mean test "
        f"accuracy of the last {FINAL_ROUNDS} evaluated rounds, val acc the same on the validation split (what tuning "
        "chooses by; - without one). Personal acc: each round's devices' own models on their own held-out "
        f"samples (personal_eval_fraction), mean of the last {FINAL_ROUNDS} rounds. Device compute s is scoring + local training summed over devices and "
        "rounds, in wall seconds; device CPU s is the same work in CPU seconds of the thread that did it, which other "
        "processes on the cores barely change (- for runs made before it was recorded). MB are tensor payload megabytes summed over rounds and devices; s/round is the mean round "
        "time on the server. (majority class): the best accuracy is within 0.5 points of the largest test "
        "class's share.",
    ]
    failed = [r for r in rows if r["status"] == "partial"]
    for r in failed:
        legend.append(f"{r['method']}: some seeds failed: {r['error']}")
    return "\n".join(lines + legend) + "\n"


# What each ranked metric is read from, and whether higher is better.
RANKED = (("final acc", "final_acc_mean", True), ("s to target", "seconds_to_target_mean", False),
          ("MB up", "mb_up_mean", False))


def method_ranks(rows: Sequence[dict]) -> dict[str, dict[str, Optional[int]]]:
    """Each method's rank (1 = best) on final accuracy, seconds to target and upload, among the methods
    with a value; equal values share a rank (1, 2, 2, 4). A method that never reached the target has no
    seconds to target and no rank there (None)."""
    ranks: dict[str, dict[str, Optional[int]]] = {r["method"]: {} for r in rows}
    for label, key, higher_better in RANKED:
        values = {r["method"]: r.get(key) for r in rows if r.get(key) is not None}
        for method in ranks:
            v = values.get(method)
            if v is None:
                ranks[method][label] = None
                continue
            better = sum(1 for w in values.values() if (w > v if higher_better else w < v))
            ranks[method][label] = better + 1
    return ranks


def ranks_markdown(rows: Sequence[dict]) -> str:
    """The rank table: which method is first on accuracy, on time to target and on upload."""
    ranks = method_ranks(rows)
    counts = {label: sum(1 for r in ranks.values() if r[label] is not None) for label, _, _ in RANKED}
    lines = ["## Ranks", "", "Rank among the methods with a value (1 = best: highest final accuracy, fewest seconds "
             "to target, fewest MB up); - = no value (target not reached). Ranks order the means; the spreads "
             "are in the table above.", "",
             "| method | " + " | ".join(f"{label} (of {counts[label]})" for label, _, _ in RANKED) + " |",
             "|---|" + "---|" * len(RANKED)]
    for method, r in ranks.items():
        lines.append(f"| {method} | " + " | ".join("-" if r[label] is None else str(r[label])
                                                    for label, _, _ in RANKED) + " |")
    return "\n".join(lines) + "\n"


def seed_ranks(runs: Sequence[RunResult], target: Optional[float]) -> dict[str, dict[int, Optional[int]]]:
    """Per seed, each method's rank (1 = first) on wall seconds to target among that seed's successful runs.

    Why per seed: a comparison's seeds may run in different sittings or on different machines, while one
    seed's runs can run back to back under one condition (as the timing block runs them). Ranks within a
    seed then compare like with like, where a mean of seconds over seeds mixes machines. Equal times share
    a rank; a run that never reached the target ranks after every run of its seed that did (misses tie);
    a method with no successful run at a seed has no rank there (None).
    """
    methods = list(dict.fromkeys(r.method for r in runs))
    ranks: dict[str, dict[int, Optional[int]]] = {m: {} for m in methods}
    if target is None:
        return ranks
    for seed in sorted({r.seed for r in runs if r.ok}):
        hits = {r.method: r.reach(target) for r in runs if r.ok and r.seed == seed}
        times = [hit[1] for hit in hits.values() if hit is not None]
        for method in methods:
            if method not in hits:
                ranks[method][seed] = None
            elif hits[method] is None:
                ranks[method][seed] = len(times) + 1
            else:
                ranks[method][seed] = 1 + sum(1 for t in times if t < hits[method][1])
    return ranks


def seed_ranks_markdown(runs: Sequence[RunResult], target: Optional[float]) -> str:
    """The per-seed rank table on seconds to target (empty with fewer than two seeds: it would repeat
    the rank table)."""
    ranks = seed_ranks(runs, target)
    seeds = sorted({s for by_seed in ranks.values() for s, rank in by_seed.items() if rank is not None})
    if len(seeds) < 2:
        return ""
    missed = {(r.method, r.seed) for r in runs if r.ok and r.reach(target) is None}
    counts = {s: sum(1 for by_seed in ranks.values() if by_seed.get(s) is not None) for s in seeds}
    lines = ["## Seconds to target, ranked within each seed", "",
             "Each seed's runs ranked by wall seconds to target among that seed's runs (1 = first); a run "
             "that never reached the target ranks after every run of its seed that did (marked `missed`). "
             "A seed's runs compare with each other when they ran under one condition; seeds run in "
             "different sittings or on different machines do not, so these ranks, not the mean seconds, "
             "are what compares across seeds.", "",
             "| method | " + " | ".join(f"seed {s} (of {counts[s]})" for s in seeds) + " | mean rank |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for method, by_seed in ranks.items():
        cells = []
        for s in seeds:
            rank = by_seed.get(s)
            cells.append("-" if rank is None else f"{rank} (missed)" if (method, s) in missed else str(rank))
        mean, std = _mean_spread([by_seed.get(s) for s in seeds])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_pm(mean, std, '.1f')} |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[dict], path: str | Path, target: Optional[float], target_note: str,
                   header: str = "", runs: Sequence[RunResult] = ()) -> None:
    """compare.md: an optional header (command, setting), the table, the ranks and, given the runs and
    more than one seed, the ranks within each seed."""
    per_seed = seed_ranks_markdown(runs, target)
    atomic_write_text(path, (header + "\n" if header else "") + markdown_table(rows, target, target_note) + "\n"
                      + ranks_markdown(rows) + ("\n" + per_seed if per_seed else ""))
