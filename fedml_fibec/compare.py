"""Run several methods side by side (each its own mpirun, same model, data, partition, sampling and
seed), then write the comparison report (fedml_fibec.report).

A method is a name mapped to config overrides: our path (training_type cross_silo) or FedML's
built-ins (training_type simulation). The method's own overrides are applied after the user's
`--set` values, because they define the method (e.g. FedNova's SGD learning rate); a tuned
setting (`--tune GRID.yaml`, fedml_fibec/tuning.py) comes last.

A comparison resumes: a run folder whose run.json says it finished with the same config file and
overrides, or whose config.yaml is the config asked for, is kept and skipped, so a rerun of the same
command does only what is missing.

With `--tune`, every grid point of a method runs once at the tuning seed, as a tuning run (validation
set only, last three evaluation rounds only) under <out>/tuning/<method>/<point>/validation-seed<s>;
the point with the best validation score is chosen, its seeds run in full in <point>/seed<s>, and
<out>/<method> links to it, so the report reads the chosen setting's seeds.

With `--settings-from DIR`, nothing is tuned: each method's seeds run at the setting DIR's tuning chose
(DIR/tuning/choices.json), in <out>/<method>/seed<s>, seed by seed across the methods. This is how
every method's chosen runs are timed again under one condition (one machine, one sitting).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from .atomic import atomic_write_text
from .config import config_differences, load_config
from .errors import ConfigError
from .layout import machine, plan
from .metrics import FINAL_ROUNDS
from .report import compare_rows, load_runs, plot_curves, target_accuracy, write_csv, write_markdown
from .report.compare import STATUS_FILE
from .tuning import GridPoint, choose, load_grid, range_edges, read_choices, read_summary, score_of

# name -> (overrides, one-line description)
METHODS: dict[str, tuple[tuple[str, ...], str]] = {
    "FibecFed": (("training_type=cross_silo", "federated_optimizer=FibecFed"),
                 "curriculum + global aggregation layers + sparse local update"),
    "FibecFed-no-curriculum": (("training_type=cross_silo", "federated_optimizer=FibecFed", "g0=1"),
                               "ablation: every sample from round 0 (g0=1)"),
    "FibecFed-all-global": (("training_type=cross_silo", "federated_optimizer=FibecFed", "gal_ratio=1",
                             "gal_mass=null"), "ablation: every block aggregated, none frozen (gal_ratio=1)"),
    "FibecFed-dense": (("training_type=cross_silo", "federated_optimizer=FibecFed", "rho=1"),
                       "ablation: dense update of the sparse-trained LoRA (rho=1)"),
    "FedAvg-LoRA": (("training_type=cross_silo", "federated_optimizer=FedAvg"),
                    "our path: every LoRA tensor and the head averaged"),
    "FFA-LoRA": (("training_type=cross_silo", "federated_optimizer=FFA-LoRA"),
                 "LoRA A frozen at its shared init; B and head trained and sent"),
    "FedSA-LoRA": (("training_type=cross_silo", "federated_optimizer=FedSA-LoRA"),
                   "LoRA A and head shared; B kept on the device"),
    "FedML-FedAvg": (("training_type=simulation", "federated_optimizer=FedAvg"),
                     "FedML's simulation-MPI FedAvg"),
    "FedML-FedProx": (("training_type=simulation", "federated_optimizer=FedProx"),
                      "FedML's FedProx, proximal term mu/2||w-w_g||^2 (fedprox_mu) in our trainer"),
    "FedML-FedOpt-Adam": (("training_type=simulation", "federated_optimizer=FedOpt", "server_optimizer=adam",
                           "server_lr=0.01", "server_momentum=0.9"), "FedML's FedOpt with a server Adam (FedAdam)"),
    "FedML-FedOpt-SGDM": (("training_type=simulation", "federated_optimizer=FedOpt", "server_optimizer=sgd",
                           "server_lr=1.0", "server_momentum=0.9"), "FedML's FedOpt with server SGD + momentum (FedAvgM)"),
    "FedML-FedNova": (("training_type=simulation", "federated_optimizer=FedNova", "client_optimizer=sgd",
                       "learning_rate=0.05"), "FedML's FedNova (SGD local steps, normalized averaging)"),
}

MPI_ENV = {
    "OMPI_MCA_rmaps_base_oversubscribe": "1",  # more ranks than cores
    "OMPI_MCA_mpi_yield_when_idle": "1",
}
ROUND_LINE = re.compile(r"round (\d+)/(\d+)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of compare_baselines.py."""
    p = argparse.ArgumentParser(description="Compare FibecFed, its ablations, LoRA-FL baselines and FedML's "
                                "built-in algorithms on the same model, data, partition, sampling and seeds.")
    p.add_argument("--out", required=True, help="comparison folder (one sub-folder per method and seed)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated methods (default: all): {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (random_seed) per method (default 1)")
    p.add_argument("--cf", help="YAML config shared by every method (default: the embedded default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every method; repeatable")
    p.add_argument("--target-acc", type=float, help="absolute target accuracy (default: a share of a reference)")
    p.add_argument("--target-fraction", type=float, default=0.95,
                   help="target = this share of the reference's best accuracy (default 0.95)")
    p.add_argument("--target-method", default="FedAvg-LoRA,FedML-FedAvg",
                   help="reference method(s), first present wins (default FedAvg-LoRA,FedML-FedAvg)")
    p.add_argument("--timeout", type=float, default=None, help="seconds one run may take (default: no limit)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from existing run folders")
    # Tune here, or reuse the settings tuned in another folder: not both.
    chooser = p.add_mutually_exclusive_group()
    chooser.add_argument("--tune", metavar="GRID.yaml", help="tune each method on the validation split over the grid "
                   "in this file first (config/tuning/grid.yaml: our grid); needs validation_fraction > 0")
    p.add_argument("--tune-seed", type=int, default=0, help="seed of the tuning runs (default 0)")
    chooser.add_argument("--settings-from", metavar="DIR", help="run each method's seeds at the setting the tuned "
                   "comparison in DIR chose (DIR/tuning/choices.json), without tuning: e.g. to time every "
                   "method's chosen runs again under one condition")
    return p.parse_args(argv)


# Variables an initialised MPI process (e.g. a caller that imported mpi4py) leaves in the environment
# of its children: an mpirun that inherits them takes itself for a rank and exits 1 without a word.
INHERITED_MPI_JOB = ("PMIX_", "OMPI_COMM_WORLD_", "OMPI_MCA_ess", "OMPI_MCA_orte_ess_", "OMPI_MCA_orte_launch",
                     "OMPI_MCA_orte_precondition_transports", "OMPI_MCA_pmix", "OMPI_APP_CTX_NUM_PROCS",
                     "ORTE_SCHIZO_DETECTION")


def _mpi_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_MPI_JOB)}
    for k, v in MPI_ENV.items():
        env.setdefault(k, v)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # The ranks import this package from the same checkout as the launcher.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"  # round lines reach the progress display as they happen
    return env


def run_command(cf: Optional[str], overrides: Sequence[str], out: Path, ranks: int) -> list[str]:
    """The mpirun command line of one run."""
    cmd = ["mpirun", "-np", str(ranks), "-x", "PYTHONPATH", "-x", "PYTHONUNBUFFERED", sys.executable, "-c",
           "import sys; from fedml_fibec.runner import main; sys.exit(main())", "--out", str(out)]
    if cf:
        cmd += ["--cf", cf]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _stop(proc: subprocess.Popen) -> None:
    """Stop mpirun: SIGTERM first, so it can take its ranks down with it, then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(text: str, n: int = 15) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def run_overrides(ns: argparse.Namespace, method: str, seed: int, setting: Sequence[str] = ()) -> list[str]:
    """The overrides of one run: the user's, the method's, the tuned setting's, the seed."""
    return [*ns.overrides, *METHODS[method][0], *setting, f"random_seed={seed}"]


def finished(out: Path, cf: Optional[str], overrides: Sequence[str]) -> Optional[dict]:
    """The status of a run in `out` that finished with this config file and these overrides, or whose
    config.yaml is the config they make (placement keys aside), else None.

    The second case keeps a finished run when the same run is asked for in other words: a grid point
    that spells out a default value (`learning_rate=0.002`), or a run folder copied in from another
    comparison. A changed default changes the config, so that run is not kept.
    """
    try:
        status = json.loads((out / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    complete = (out / "metrics.jsonl").is_file() and (out / "summary.json").is_file()
    if status.get("status") != "ok" or not complete:
        return None
    if status.get("cf") == cf and status.get("requested_overrides") == list(overrides):
        return status
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
        wanted = load_config(cf, list(overrides))
    except (OSError, yaml.YAMLError, ConfigError):
        return None
    return status if isinstance(saved, dict) and not config_differences(wanted, saved) else None


def launch(method: str, seed: int, ns: argparse.Namespace, root: Path, progress,
           setting: Sequence[str] = (), out: Optional[Path] = None) -> dict:
    """Run one (method, seed[, setting]) under mpirun, or skip it if it already finished the same way;
    write and return its status (run.json)."""
    out = out or root / method / f"seed{seed}"
    requested = run_overrides(ns, method, seed, setting)
    done = finished(out, ns.cf, requested)
    if done is not None:
        return {**done, "skipped": True}
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json", STATUS_FILE):
        (out / stale).unlink(missing_ok=True)
    overrides = list(requested)
    status = {"method": method, "seed": seed, "cf": ns.cf, "requested_overrides": requested,
              "setting": list(setting), "overrides": overrides}
    started = time.time()
    try:
        cfg = load_config(ns.cf, overrides)
    except ConfigError as exc:
        status.update(status="failed", error=f"config error: {exc}", returncode=2, wall_seconds=0.0)
        atomic_write_text(out / STATUS_FILE, json.dumps(status, indent=2) + "\n")
        return status
    # The machine's layout (fedml_fibec/layout.py): fewer client processes on a small machine, same results.
    workers, _ = plan(cfg, *machine())
    if workers != cfg.worker_num:
        overrides.append(f"worker_num={workers}")
    cmd = run_command(ns.cf, overrides, out, workers + 1)
    status["command"] = shlex.join(cmd)
    log_path = out / "launcher.log"
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_mpi_env(),
                                bufsize=1)
        # A timer, not a check per output line: a hung run prints nothing.
        timer = threading.Timer(ns.timeout, _stop, (proc,)) if ns.timeout else None
        if timer:
            timer.start()
        try:
            for line in proc.stdout:
                log_file.write(line)
                tail.append(line.rstrip())
                m = ROUND_LINE.search(line)
                if m and "[rank 0]" in line:
                    progress(f"round {m.group(1)}/{m.group(2)}", line.split("] ", 1)[-1].strip())
            returncode = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            if timer:
                timer.cancel()
    status["returncode"] = returncode
    status["wall_seconds"] = time.time() - started
    error = None
    if ns.timeout and status["wall_seconds"] > ns.timeout:
        error = f"timed out after {ns.timeout:.0f} s"
    elif returncode != 0:
        error = f"exit code {returncode}: {_tail(chr(10).join(tail))}"
    elif not (out / "metrics.jsonl").is_file() or not (out / "summary.json").is_file():
        error = "exit code 0 but no metrics.jsonl / summary.json"
    status.update(status="failed" if error else "ok", error=error)
    atomic_write_text(out / STATUS_FILE, json.dumps(status, indent=2) + "\n")
    return status


def _fmt_s(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


def build_report(root: Path, methods: Sequence[str], ns: argparse.Namespace, header: str = "",
                 choices: Optional[dict[str, dict]] = None) -> dict:
    """compare.csv, compare.md and the PNG plots from the run folders; returns target and rows."""
    runs = load_runs(root, [m for m in methods if (root / m).exists()] if choices else methods)
    target, note = target_accuracy(runs, reference=[m.strip() for m in ns.target_method.split(",")],
                                   fraction=ns.target_fraction, absolute=ns.target_acc)
    rows = compare_rows(runs, target)
    if choices:
        for row in rows:
            c = choices.get(row["method"], {})
            row["tuned_setting"], row["validation_score"] = " ".join(c.get("setting") or []), c.get("score")
            if c:
                row["tuning_points"] = f"{c['points_run']}/{c['points_total']}"
                row["tuning_incomplete"] = c["points_run"] < c["points_total"]
        majority = {r["method"]: r.get("majority_share") for r in rows if r.get("at_majority")}
        header += "\n" + tuning_markdown(choices, ns, majority)
    write_csv(rows, root / "compare.csv")
    write_markdown(rows, root / "compare.md", target, note, header, runs=runs)
    plots = plot_curves(runs, root, target)
    return {"target": target, "target_note": note, "rows": rows, "plots": [str(p) for p in plots]}


def runs_wall_seconds(root: Path) -> tuple[float, int]:
    """Summed wall time and count of the finished runs under `root` (every seed and grid point, each
    counted once): the comparison's cost whatever sittings or copied-in runs it took."""
    total, count = 0.0, 0
    # The <root>/<method> links of a tuned comparison point into tuning/: not followed, so not counted twice.
    for folder, _dirs, files in os.walk(root, followlinks=False):
        if STATUS_FILE not in files:
            continue
        try:
            status = json.loads((Path(folder) / STATUS_FILE).read_text())
        except (OSError, ValueError):
            continue
        if status.get("status") == "ok":
            total, count = total + float(status.get("wall_seconds") or 0.0), count + 1
    return total, count


def _header(ns: argparse.Namespace, methods: Sequence[str], argv: Sequence[str], seconds: float,
            runs: tuple[float, int] = (0.0, 0)) -> str:
    lines = ["# Comparison", "", "```", "python run_scripts/compare_baselines.py " + shlex.join(argv), "```", "",
             f"Methods: {', '.join(methods)}; seeds 0..{ns.seeds - 1}; config "
             f"{ns.cf or 'embedded default'} with {', '.join(ns.overrides) or 'no overrides'}; "
             + (f"total wall time {_fmt_s(seconds)} in the sittings of this command; " if seconds > 0 else "")
             + f"{runs[1]} finished run(s) took {_fmt_s(runs[0])} together.", ""]
    lines += [f"- **{m}**: {METHODS[m][1]} (`{' '.join(METHODS[m][0])}`)" for m in methods if m in METHODS]
    return "\n".join(lines) + "\n"


class Jobs:
    """Runs the comparison's jobs one after another: progress lines, skips of finished runs, failures."""

    def __init__(self, ns: argparse.Namespace, root: Path, total: int):
        self.ns, self.root, self.total = ns, root, total
        self.started, self.count, self.ran, self.failed = time.time(), 0, 0, 0

    def run(self, method: str, seed: int, setting: Sequence[str] = (), out: Optional[Path] = None) -> dict:
        self.count += 1
        label = f"{method} seed {seed}" + (f" [{' '.join(setting)}]" if setting else "")
        prefix = f"[{self.count}/{self.total}] {label}"
        out = out or self.root / method / f"seed{seed}"
        done = finished(out, self.ns.cf, run_overrides(self.ns, method, seed, setting))
        if done is not None:
            print(f"{prefix}: finished before, kept", flush=True)
            return {**done, "skipped": True}
        elapsed = time.time() - self.started
        eta = "-" if not self.ran else _fmt_s(elapsed / self.ran * (self.total - self.count + 1))
        print(f"{prefix}: starting (elapsed {_fmt_s(elapsed)}, ETA {eta})", flush=True)
        status = launch(method, seed, self.ns, self.root, lambda where, msg: print(f"{prefix}: {msg}", flush=True),
                        setting, out)
        self.ran += 1
        if status["status"] == "ok":
            print(f"{prefix}: done in {status['wall_seconds']:.0f} s", flush=True)
        else:
            self.failed += 1
            print(f"{prefix}: FAILED ({status['error'].splitlines()[0][:200]})", flush=True)
        return status


def _check_tuning(ns: argparse.Namespace, methods: Sequence[str]) -> dict[str, list[GridPoint]]:
    """The grid, every point's config checked before any run (keys, values, a validation split)."""
    grids = load_grid(ns.tune, methods)
    for method, points in grids.items():
        for point in points:
            try:
                cfg = load_config(ns.cf, run_overrides(ns, method, ns.tune_seed, point.overrides))
            except ConfigError as exc:
                raise ConfigError(f"--tune {ns.tune}: {method} at {point.slug}: {exc}") from None
            if cfg.data_args.validation_fraction <= 0:
                raise ConfigError(f"--tune {ns.tune}: tuning chooses on validation accuracy, but "
                                  f"data_args.validation_fraction = {cfg.data_args.validation_fraction}; add "
                                  "--set validation_fraction=0.1 (the test set is never used to choose)")
    return grids


def _check_settings(ns: argparse.Namespace, methods: Sequence[str]) -> dict[str, list[str]]:
    """The settings of --settings-from, every method's config checked before any run."""
    where = f"--settings-from {ns.settings_from}"
    try:
        settings = read_choices(ns.settings_from, methods)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for method, setting in settings.items():
        try:
            load_config(ns.cf, run_overrides(ns, method, 0, setting))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {method} at {' '.join(setting)}: {exc}") from None
    return settings


# A tuning run evaluates what its score reads and nothing else: the validation set at the last FINAL_ROUNDS
# evaluation rounds (the score is their mean), never the test set. Evaluation draws no random numbers and
# the server trains nothing, so these are the validation accuracies the full run would have; the server's
# evaluation is 40-75% of a full run's wall time on a 2-core machine (docs/results/compare_tuned).
TUNING_RUN_OVERRIDES = ("eval_test_set=false", f"eval_only_last={FINAL_ROUNDS}")


def tuning_run(ns: argparse.Namespace, method: str, point: GridPoint, folder: Path,
               jobs: Optional[Jobs]) -> Optional[dict]:
    """A grid point's run at the tuning seed: its summary (None if it has not run).

    A full run of the point at the tuning seed (<point>/seed<s>: test set, every round) already holds the
    score, so it is read instead; otherwise the tuning run goes to <point>/validation-seed<s>. With jobs=None
    nothing runs. The chosen point's seeds are full runs in <point>/seed<s>, the tuning seed among them.
    """
    seed = ns.tune_seed
    full = folder / f"seed{seed}"
    if finished(full, ns.cf, run_overrides(ns, method, seed, point.overrides)) is not None:
        return read_summary(full)
    lean = folder / f"validation-seed{seed}"
    if jobs is not None:
        jobs.run(method, seed, [*point.overrides, *TUNING_RUN_OVERRIDES], lean)
    return read_summary(lean)


def tune(ns: argparse.Namespace, methods: Sequence[str], grids: dict[str, list[GridPoint]], root: Path,
         jobs: Optional[Jobs]) -> dict[str, dict]:
    """Run (or read) every grid point at the tuning seed; choose each method's point; link <root>/<method>.

    Returns method -> {"setting", "slug", "score", "points": [{"slug", "score", "final_accuracy"}]}; written
    to <root>/tuning/choices.json. With jobs=None nothing runs (the report reads what is there).
    """
    choices: dict[str, dict] = {}
    for method in methods:
        points = grids[method]
        scores, rows = [], []
        for point in points:
            folder = root / "tuning" / method / point.slug
            summary = tuning_run(ns, method, point, folder, jobs)
            scores.append(score_of(summary))
            rows.append({"slug": point.slug, "setting": point.overrides, "score": scores[-1],
                         "final_accuracy": (summary or {}).get("final_accuracy")})
        best = choose(points, scores)
        # A choice among part of the grid is provisional: the report says how much of the grid has run.
        choice = {"points": rows, "setting": None, "slug": None, "score": None, "edges": [],
                  "points_run": sum(s is not None for s in scores), "points_total": len(points)}
        if best is not None:
            choice.update(setting=points[best].overrides, slug=points[best].slug, score=scores[best],
                          edges=range_edges(points, best))
            link = root / method
            if link.is_symlink() or not link.exists():
                tmp = root / f".{method}.link"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(Path("tuning") / method / points[best].slug)
                os.replace(tmp, link)  # atomic: the report never sees a half-made link
            else:
                raise ConfigError(f"{link} is a folder of an untuned comparison; use another --out for tuning")
        choices[method] = choice
    atomic_write_text(root / "tuning" / "choices.json", json.dumps(choices, indent=2) + "\n")
    return choices


def tuning_markdown(choices: dict[str, dict], ns: argparse.Namespace, majority: dict[str, Optional[float]]) -> str:
    """The grid, each point's validation score, the chosen setting (and a method left at the majority class)."""
    lines = ["## Tuning", "",
             f"Grid: `{ns.tune}`; one run per point at seed {ns.tune_seed}; score = mean validation accuracy of the "
             f"last {FINAL_ROUNDS} evaluated rounds (the test set is never read to choose: a tuning run does not "
             "evaluate it). Chosen point in bold.", "",
             "| method | setting | validation score | test acc, last round (not used; - = not evaluated) |",
             "|---|---|---|---|"]
    for method, c in choices.items():
        for row in c["points"]:
            chosen = row["slug"] == c["slug"]
            cell = lambda x: "-" if x is None else f"{x:.4f}"
            name = f"**{row['slug']}**" if chosen else row["slug"]
            lines.append(f"| {method} | {name} | {cell(row['score'])} | {cell(row['final_accuracy'])} |")
    partial = [f"{m} {c['points_run']}/{c['points_total']}" for m, c in choices.items()
               if c["points_run"] < c["points_total"]]
    if partial:
        lines += ["", "Tuning not finished (grid points with a validation score / grid points): " + ", ".join(partial)
                  + ". Their bold point is the best so far, not a final choice."]
    edges = [f"{m}: {', '.join(c['edges'])}" for m, c in choices.items() if c.get("edges")]
    if edges:
        lines += ["", "Best point at the edge of its range (a better setting may lie beyond it: extend the grid "
                  "that way; a rerun runs only the new points): " + "; ".join(edges) + "."]
    stuck = [m for m, share in majority.items() if share is not None]
    if stuck:
        lines += ["", "At the majority class after tuning (best test accuracy within 0.5 points of the largest "
                  "class's share): " + ", ".join(f"{m} (best point {choices[m]['slug']}, majority share "
                                                  f"{majority[m]:.3f})" for m in stuck) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of compare_baselines.py: (tune,) run every (method, seed), then the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if ns.seeds < 1:
        print("--seeds must be at least 1", file=sys.stderr)
        return 2
    grids, settings = None, {}
    try:
        if ns.tune:
            grids = _check_tuning(ns, methods)
        if ns.settings_from:
            settings = _check_settings(ns, methods)
    except ConfigError as exc:
        print(f"compare_baselines: {exc}", file=sys.stderr)
        return 2
    root = Path(ns.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the running mpirun is stopped with its ranks (launch's handler).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    seeds = list(range(ns.seeds))
    total = len(methods) * len(seeds) + (sum(len(grids[m]) for m in methods) if grids else 0)
    jobs = Jobs(ns, root, total)
    choices = None
    if grids:
        try:
            choices = tune(ns, methods, grids, root, None if ns.report_only else jobs)
        except ConfigError as exc:
            print(f"compare_baselines: {exc}", file=sys.stderr)
            return 2
        edged = [] if ns.report_only else [m for m in methods if choices[m]["edges"]]
        for m in edged:
            print(f"compare_baselines: {m}'s best point is at the edge of its grid: "
                  f"{', '.join(choices[m]['edges'])}; extend the range in {ns.tune} to look beyond it", file=sys.stderr)
        missing = [m for m in methods if choices[m]["setting"] is None]
        if missing and not ns.report_only:
            print(f"compare_baselines: no grid point of {missing} has a validation score (see their runs under "
                  f"{root / 'tuning'})", file=sys.stderr)
    if not ns.report_only:
        for seed in seeds:
            for method in methods:
                if choices is None:
                    jobs.run(method, seed, settings.get(method, ()))
                elif choices[method]["setting"] is not None:
                    c = choices[method]
                    jobs.run(method, seed, c["setting"], root / "tuning" / method / c["slug"] / f"seed{seed}")
    header_argv, seconds = argv, time.time() - jobs.started
    run_record = root / "comparison.json"
    if not ns.report_only:
        # Seconds of this sitting; a resumed comparison adds the sittings before it.
        sittings = json.loads(run_record.read_text()).get("sittings", []) if run_record.is_file() else []
        sittings.append({"argv": argv, "wall_seconds": seconds, "runs": jobs.ran})
        atomic_write_text(run_record, json.dumps({"argv": argv, "wall_seconds": sum(x["wall_seconds"] for x in sittings),
                                                  "sittings": sittings}, indent=2) + "\n")
        seconds = sum(x["wall_seconds"] for x in sittings)
    elif run_record.is_file():
        # The header names the command that made the runs, not the --report-only call that re-read them.
        made = json.loads(run_record.read_text())
        header_argv, seconds = made["argv"], made["wall_seconds"]
    else:  # a report of runs no command here made (copied in): only their own wall time is known
        seconds = 0.0
    header = _header(ns, methods, header_argv, seconds, runs_wall_seconds(root))
    if settings:
        header += (f"\nSettings chosen by the tuning in `{ns.settings_from}` (not tuned here): "
                   + "; ".join(f"{m} {' '.join(s)}" for m, s in settings.items()) + ".\n")
    report = build_report(root, methods, ns, header, choices)
    print()
    print((root / "compare.md").read_text())
    print(f"report: {root / 'compare.csv'}, {root / 'compare.md'}, {', '.join(Path(p).name for p in report['plots'])}")
    return 1 if jobs.failed and jobs.failed == jobs.ran else 0
