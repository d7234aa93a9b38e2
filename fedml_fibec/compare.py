"""Run several methods side by side (each its own mpirun, same model, data, partition, sampling and
seed), then write the comparison report (fedml_fibec.report).

A method is a name mapped to config overrides: our path (training_type cross_silo) or FedML's
built-ins (training_type simulation). The method's own overrides are applied after the user's
`--set` values, because they define the method (e.g. FedNova's SGD learning rate).
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

from .atomic import atomic_write_text
from .config import load_config
from .errors import ConfigError
from .layout import machine, plan
from .report import compare_rows, load_runs, plot_curves, target_accuracy, write_csv, write_markdown
from .report.compare import STATUS_FILE

# name -> (overrides, one-line description)
METHODS: dict[str, tuple[tuple[str, ...], str]] = {
    "FibecFed": (("training_type=cross_silo", "federated_optimizer=FibecFed"),
                 "curriculum + global aggregation layers + sparse local update"),
    "FibecFed-no-curriculum": (("training_type=cross_silo", "federated_optimizer=FibecFed", "g0=1"),
                               "ablation: every sample from round 0 (g0=1)"),
    "FibecFed-all-global": (("training_type=cross_silo", "federated_optimizer=FibecFed", "gal_ratio=1",
                             "gal_mass=null"), "ablation: every layer aggregated (gal_ratio=1)"),
    "FibecFed-dense": (("training_type=cross_silo", "federated_optimizer=FibecFed", "rho=1"),
                       "ablation: dense update of the device-local layers (rho=1)"),
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


def launch(method: str, seed: int, ns: argparse.Namespace, root: Path, progress) -> dict:
    """Run one (method, seed) under mpirun; write and return its status (run.json)."""
    out = root / method / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json", STATUS_FILE):
        (out / stale).unlink(missing_ok=True)
    overrides = [*ns.overrides, *METHODS[method][0], f"random_seed={seed}"]
    status = {"method": method, "seed": seed, "overrides": overrides}
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


def build_report(root: Path, methods: Sequence[str], ns: argparse.Namespace, header: str = "") -> dict:
    """compare.csv, compare.md and the PNG plots from the run folders; returns target and rows."""
    runs = load_runs(root, methods)
    target, note = target_accuracy(runs, reference=[m.strip() for m in ns.target_method.split(",")],
                                   fraction=ns.target_fraction, absolute=ns.target_acc)
    rows = compare_rows(runs, target)
    write_csv(rows, root / "compare.csv")
    write_markdown(rows, root / "compare.md", target, note, header)
    plots = plot_curves(runs, root, target)
    return {"target": target, "target_note": note, "rows": rows, "plots": [str(p) for p in plots]}


def _header(ns: argparse.Namespace, methods: Sequence[str], argv: Sequence[str], seconds: float) -> str:
    lines = ["# Comparison", "", "```", "python run_scripts/compare_baselines.py " + shlex.join(argv), "```", "",
             f"Methods: {', '.join(methods)}; seeds 0..{ns.seeds - 1}; config "
             f"{ns.cf or 'embedded default'} with {', '.join(ns.overrides) or 'no overrides'}; "
             f"total wall time {_fmt_s(seconds)}.", ""]
    lines += [f"- **{m}**: {METHODS[m][1]} (`{' '.join(METHODS[m][0])}`)" for m in methods if m in METHODS]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of compare_baselines.py: run every (method, seed), then the report."""
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
    root = Path(ns.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the running mpirun is stopped with its ranks (launch's handler).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    jobs = [(m, s) for s in range(ns.seeds) for m in methods]
    started = time.time()
    failed = 0
    if not ns.report_only:
        for i, (method, seed) in enumerate(jobs):
            done = time.time() - started
            eta = "-" if i == 0 else _fmt_s(done / i * (len(jobs) - i))
            prefix = f"[{i + 1}/{len(jobs)}] {method} seed {seed}"
            print(f"{prefix}: starting (elapsed {_fmt_s(done)}, ETA {eta})", flush=True)
            status = launch(method, seed, ns, root,
                            lambda where, msg, p=prefix: print(f"{p}: {msg}", flush=True))
            if status["status"] == "ok":
                print(f"{prefix}: done in {status['wall_seconds']:.0f} s", flush=True)
            else:
                failed += 1
                print(f"{prefix}: FAILED ({status['error'].splitlines()[0][:200]})", flush=True)
    header_argv, seconds = argv, time.time() - started
    run_record = root / "comparison.json"
    if not ns.report_only:
        atomic_write_text(run_record, json.dumps({"argv": argv, "wall_seconds": seconds}, indent=2) + "\n")
    elif run_record.is_file():
        # The header names the command that made the runs, not the --report-only call that re-read them.
        made = json.loads(run_record.read_text())
        header_argv, seconds = made["argv"], made["wall_seconds"]
    report = build_report(root, methods, ns, _header(ns, methods, header_argv, seconds))
    print()
    print((root / "compare.md").read_text())
    print(f"report: {root / 'compare.csv'}, {root / 'compare.md'}, {', '.join(Path(p).name for p in report['plots'])}")
    return 1 if failed == len(jobs) else 0
