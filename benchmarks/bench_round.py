#!/usr/bin/env python
"""A round of the federated job broken down (issue 6, benchmark 3).

Two modes:

  run      launch an instrumented job (benchmarks/round_rank.py under mpirun: run_fibec.py plus timers),
           sample the resident memory of the whole process tree while it runs, then `analyze` it:
             python benchmarks/bench_round.py run --np 3 --out /tmp/round -- \\
                 --set client_num_per_round=2 --set client_num_in_total=4 --set comm_round=2 ...
           Everything after `--` goes to run_fibec.py (--cf / --set). The main job: `--np 11 --out DIR --`
           with no overrides (the embedded default).
  analyze  read a finished run's folder and print the breakdown:
             python benchmarks/bench_round.py analyze DIR
           With an instrumented run (DIR/bench_timing/) every part is measured; with a plain run_fibec.py
           folder only metrics.jsonl is there (round seconds, bytes, and the trainer's per-device
           scoring/train/eval seconds where recorded).

Per round (window between the server's end-of-round marks; round 0 also holds FibecFed's layer-scoring
exchange), on the critical path (the server plus the client whose local work took longest):
  local_compute (train_steps), scoring (difficulty + layer sensitivity), evaluation (device + server),
  serialization (to_wire + pickle dumps/loads), mpi_transfer (send_message minus its pickling),
  aggregation (aggregate minus its to_wire), state_io (device state store), client_other (rest of the
  trainer's round) and idle (the rest of the window: waiting, stragglers, FedML's own bookkeeping).
`overhead_share` = 1 - (local_compute + scoring + evaluation) / wall: the issue's target is < 0.10.
Memory: the peak over time of the summed RSS and PSS of all ranks (RSS counts shared library pages once
per process; PSS splits them), and each rank's own peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# memory sampling -----------------------------------------------------------------------------------

def _rollup(pid: int) -> dict:
    """Rss, Pss and private bytes of one process from /proc/<pid>/smaps_rollup (Linux)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        return {}
    out["Private"] = out.pop("Private_Clean", 0) + out.pop("Private_Dirty", 0)
    return out


class MemorySampler(threading.Thread):
    """Every `interval` s, sum Rss/Pss/Private over the python processes below `root_pid`."""

    def __init__(self, root_pid: int, interval: float):
        super().__init__(daemon=True)
        self.root_pid, self.interval = root_pid, interval
        self.stop = threading.Event()
        self.peak = {"rss": 0, "pss": 0, "private": 0, "processes": 0}
        self.per_pid_peak_rss: dict[int, int] = defaultdict(int)
        self.samples = 0

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.root_pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            try:
                procs = [p for p in root.children(recursive=True) if "python" in (p.name() or "")]
            except psutil.Error:
                procs = []
            total = {"rss": 0, "pss": 0, "private": 0}
            for p in procs:
                r = _rollup(p.pid)
                if not r:
                    continue
                total["rss"] += r.get("Rss", 0)
                total["pss"] += r.get("Pss", 0)
                total["private"] += r.get("Private", 0)
                self.per_pid_peak_rss[p.pid] = max(self.per_pid_peak_rss[p.pid], r.get("Rss", 0))
            for k, v in total.items():
                self.peak[k] = max(self.peak[k], v)
            self.peak["processes"] = max(self.peak["processes"], len(procs))
            self.samples += 1
            self.stop.wait(self.interval)


def cmd_run(ns, rest: list[str]) -> int:
    out = Path(ns.out).resolve()
    if out.exists() and any(out.iterdir()):
        if not ns.force:
            print(f"{out} is not empty (use --force to clear it)", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        print("mpirun not found", file=sys.stderr)
        return 2
    cmd = [mpirun, "--oversubscribe", "-np", str(ns.np)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, str(ROOT / "benchmarks" / "round_rank.py"), "--out", str(out), *rest]
    started = time.time()
    with open(out / "bench_round_stdout.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        sampler = MemorySampler(proc.pid, ns.sample_interval)
        sampler.start()
        try:
            rc = proc.wait(timeout=ns.timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            rc = proc.wait()
            print(f"timed out after {ns.timeout}s", file=sys.stderr)
        sampler.stop.set()
        sampler.join()
    memory = {"peak_sum_rss_bytes": sampler.peak["rss"], "peak_sum_pss_bytes": sampler.peak["pss"],
              "peak_sum_private_bytes": sampler.peak["private"], "processes": sampler.peak["processes"],
              "per_process_peak_rss_bytes": sorted(sampler.per_pid_peak_rss.values(), reverse=True),
              "samples": sampler.samples, "interval_s": ns.sample_interval, "np": ns.np,
              "wall_s": time.time() - started, "returncode": rc, "command": cmd}
    (out / "bench_round_memory.json").write_text(json.dumps(memory, indent=1) + "\n")
    if rc != 0:
        print(f"the run failed (rc {rc}); see {out}/bench_round_stdout.log and {out}/logs/", file=sys.stderr)
        return rc
    return analyze(out)


# analysis --------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _sum(events, kind) -> float:
    return sum(e["seconds"] for e in events if e["kind"] == kind)


def analyze(out: Path) -> int:
    out = Path(out)
    metrics_path = out / "metrics.jsonl"
    metrics = _read_jsonl(metrics_path) if metrics_path.is_file() else []
    by_round = {m["round"]: m for m in metrics}
    timing_dir = out / "bench_timing"
    events: list[dict] = []
    if timing_dir.is_dir():
        for f in sorted(timing_dir.glob("rank*.jsonl")):
            events += _read_jsonl(f)
    memory = json.loads((out / "bench_round_memory.json").read_text()) if (out / "bench_round_memory.json").is_file() \
        else None
    base = {"bench": "round", "out": str(out)}
    rows = []
    if events:
        ends = sorted((e["start"], e["round"]) for e in events if e["kind"] == "round_end" and e["rank"] == 0)
        first_send = min((e["start"] for e in events if e["kind"] == "mpi_send" and e["rank"] == 0), default=None)
        start = first_send if first_send is not None else min(e["start"] for e in events)
        timed = [e for e in events if "seconds" in e]
        for end, r in ends:
            window = [e for e in timed if start <= e["start"] < end]
            rows.append(_round_row(r, start, end, window, by_round.get(r)))
            start = end
    else:
        for m in metrics:
            rows.append(_metrics_only_row(m))
    for row in rows:
        emit({**base, "what": "round", **row})
    summary = {**base, "what": "summary", "rounds": len(rows), "instrumented": bool(events)}
    if rows:
        keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and k != "round"]
        # Round 0 also holds the one-off layer-scoring exchange; the steady state is the later rounds.
        steady = rows[1:] or rows
        summary["median_over_rounds"] = {k: statistics.median(r[k] for r in steady if r.get(k) is not None)
                                         for k in keys if any(r.get(k) is not None for r in steady)}
        summary["rounds_in_median"] = [r["round"] for r in steady]
        if "overhead_share" in summary["median_over_rounds"]:
            summary["targets"] = {"overhead_share<0.10": summary["median_over_rounds"]["overhead_share"] < 0.10}
    if memory:
        summary["memory"] = {k: memory[k] for k in ("peak_sum_rss_bytes", "peak_sum_pss_bytes",
                                                    "peak_sum_private_bytes", "processes", "np")}
        summary["memory"]["peak_sum_rss_gb"] = round(memory["peak_sum_rss_bytes"] / 1e9, 3)
        summary["memory"]["peak_sum_pss_gb"] = round(memory["peak_sum_pss_bytes"] / 1e9, 3)
        summary.setdefault("targets", {})["peak_sum_rss<6GB"] = memory["peak_sum_rss_bytes"] < 6e9
    peaks = sorted((e for e in events if e["kind"] == "peak"), key=lambda e: e["rank"])
    if peaks:
        summary["peak_rss_bytes_per_rank"] = {e["rank"]: e["max_rss_bytes"] for e in peaks}
        cuda = {e["rank"]: e["cuda_max_allocated_bytes"] for e in peaks if "cuda_max_allocated_bytes" in e}
        if cuda:
            summary["cuda_max_allocated_bytes_per_rank"] = cuda
    emit(summary)
    return 0


def _round_row(r: int, start: float, end: float, window: list[dict], metrics: dict | None) -> dict:
    wall = end - start
    server = [e for e in window if e["rank"] == 0]
    clients = defaultdict(list)
    for e in window:
        if e["rank"] != 0:
            clients[e["rank"]].append(e)

    def client_parts(ev):
        train = _sum(ev, "client_train")
        parts = {"local_compute": _sum(ev, "local_compute"),
                 "scoring": _sum(ev, "scoring_difficulty") + _sum(ev, "scoring_layers"),
                 "device_eval": _sum(ev, "device_eval"), "state_io": _sum(ev, "state_io"),
                 "to_wire": _sum(ev, "to_wire")}
        parts["client_other"] = max(0.0, train - sum(parts.values()))
        parts["pickle"] = _sum(ev, "pickle_dumps") + _sum(ev, "pickle_loads")
        parts["mpi_send"] = max(0.0, _sum(ev, "mpi_send") - _sum(ev, "pickle_dumps"))
        parts["train_total"] = train
        return parts

    per_client = {rank: client_parts(ev) for rank, ev in clients.items()}
    critical = max(per_client.values(), key=lambda p: p["train_total"], default=None) or \
        {k: 0.0 for k in ("local_compute", "scoring", "device_eval", "state_io", "to_wire", "client_other",
                          "pickle", "mpi_send", "train_total")}
    s_wire = _sum(server, "to_wire")
    s_dumps = _sum(server, "pickle_dumps")
    row = {
        "round": r,
        "wall_s": wall,
        "local_compute_s": critical["local_compute"],
        "scoring_s": critical["scoring"],
        "evaluation_s": critical["device_eval"] + _sum(server, "server_eval"),
        "serialization_s": critical["to_wire"] + critical["pickle"] + s_wire + s_dumps + _sum(server, "pickle_loads"),
        "mpi_transfer_s": critical["mpi_send"] + max(0.0, _sum(server, "mpi_send") - s_dumps),
        "aggregation_s": max(0.0, _sum(server, "aggregate") - s_wire),
        "state_io_s": critical["state_io"],
        "client_other_s": critical["client_other"],
        "server_test_other_s": max(0.0, _sum(server, "server_test") - _sum(server, "server_eval")),
        "clients": len(per_client),
        "client_train_s_max": critical["train_total"],
        "client_train_s_mean": statistics.mean(p["train_total"] for p in per_client.values()) if per_client else None,
        "pickled_bytes_server_out": sum(e.get("nbytes", 0) for e in server if e["kind"] == "pickle_dumps"),
        "pickled_bytes_clients_out": sum(e.get("nbytes", 0) for e in window
                                         if e["rank"] != 0 and e["kind"] == "pickle_dumps"),
    }
    accounted = sum(row[k] for k in ("local_compute_s", "scoring_s", "evaluation_s", "serialization_s",
                                     "mpi_transfer_s", "aggregation_s", "state_io_s", "client_other_s",
                                     "server_test_other_s"))
    row["idle_s"] = max(0.0, wall - accounted)
    work = row["local_compute_s"] + row["scoring_s"] + row["evaluation_s"]
    row["overhead_share"] = 1.0 - work / wall if wall > 0 else None
    if metrics:
        row["bytes_up"] = metrics.get("bytes_up")
        row["bytes_down"] = metrics.get("bytes_down")
        row["round_seconds_metrics"] = metrics.get("round_seconds")
        row["global_accuracy"] = metrics.get("global_accuracy")
    return row


def _metrics_only_row(m: dict) -> dict:
    row = {"round": m["round"], "wall_s": m.get("round_seconds"), "bytes_up": m.get("bytes_up"),
           "bytes_down": m.get("bytes_down"), "global_accuracy": m.get("global_accuracy")}
    for key in ("scoring_seconds", "train_seconds", "eval_seconds"):
        if m.get(key) is not None:
            row[f"device_mean_{key}"] = m[key]
    return row


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run", help="launch an instrumented run, then analyze it")
    r.add_argument("--np", type=int, default=11, help="MPI processes (client_num_per_round + 1)")
    r.add_argument("--out", required=True, help="run folder")
    r.add_argument("--force", action="store_true", help="clear --out first")
    # 5 s, not finer: reading smaps_rollup of 11 ranks every 0.5 s took ~20% of a core, slowing the run it measures.
    r.add_argument("--sample-interval", type=float, default=5.0, help="memory sampling period, seconds")
    r.add_argument("--timeout", type=float, default=None, help="kill the run after this many seconds")
    a = sub.add_parser("analyze", help="break down a finished run's folder")
    a.add_argument("out")
    ns = p.parse_args(argv)
    if ns.mode == "run":
        return cmd_run(ns, rest)
    return analyze(Path(ns.out))


if __name__ == "__main__":
    sys.exit(main())
