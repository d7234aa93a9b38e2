#!/usr/bin/env python
"""The main job in two process layouts, one after the other: FedML's 11 ranks and the automatic one.

    python benchmarks/bench_layout.py --out results/bench_layout [--layouts 11,auto] [-- run_fibec args]

Each layout is launched exactly as a user would (`bash run_scripts/run_main.sh`, with NP=11 for the
11-rank layout), and measured from outside:
  wall_s             launch to exit of run_main.sh
  startup_s          launch to the server's first exchange (imports, data, model on every rank, connect)
  peak_rss_gb        peak over time of the summed resident memory of all ranks (sampled every 2 s)
  peak_pss_gb        the same with shared pages split between processes
  console_lines      lines the job printed on the terminal
and the per-round accuracies of the layouts are compared (they must be identical). A layout whose
folder already holds summary.json and bench.json is not run again (resume after an interruption).
Writes OUT/bench_layout.json and OUT/bench_layout.md; prints one JSON line per layout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_round import MemorySampler  # noqa: E402

from fedml_fibec.atomic import atomic_write_text  # noqa: E402
from fedml_fibec.layout import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ACCURACY_KEYS = ("global_accuracy", "device_accuracy", "train_loss", "bytes_up", "bytes_down", "devices")


def run_layout(name: str, out: Path, extra: list[str], interval: float) -> dict:
    done = out / "bench.json"
    if done.exists() and (out / "summary.json").exists():
        return json.loads(done.read_text())
    env = dict(os.environ)
    env.pop("NP", None)
    if name != "auto":
        env["NP"] = name
    cmd = ["bash", str(ROOT / "run_scripts" / "run_main.sh"), "--out", str(out), *extra]
    out.mkdir(parents=True, exist_ok=True)
    launched = time.time()
    with open(out / "console.txt", "w") as console:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT)
        sampler = MemorySampler(proc.pid, interval)
        sampler.start()
        code = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.time() - launched
    if code != 0:
        raise SystemExit(f"layout {name}: run_main.sh exited {code}; see {out / 'console.txt'}")
    summary = json.loads((out / "summary.json").read_text())
    result = {
        "layout": name, "ranks": summary["world_size"], "worker_num": summary.get("worker_num"),
        "wall_s": round(wall, 1), "startup_s": round(summary["first_exchange_at"] - launched, 1),
        "peak_rss_gb": round(sampler.peak["rss"] / 1e9, 2), "peak_pss_gb": round(sampler.peak["pss"] / 1e9, 2),
        "processes": sampler.peak["processes"], "memory_samples": sampler.samples,
        "console_lines": sum(1 for line in (out / "console.txt").read_text().splitlines() if line.strip()),
        "final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
        "command": ("NP=" + name + " " if name != "auto" else "") + " ".join(cmd[1:]),
    }
    atomic_write_text(done, json.dumps(result, indent=2) + "\n")
    return result


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", required=True)
    p.add_argument("--layouts", default="11,auto", help="comma-separated: a rank count (NP) or auto")
    p.add_argument("--interval", type=float, default=2.0, help="memory sampling interval in seconds")
    ns = p.parse_args(argv)
    root = Path(ns.out).resolve()
    cores, memory = machine()
    results = []
    for name in ns.layouts.split(","):
        r = run_layout(name, root / f"layout-{name}", extra, ns.interval)
        print(json.dumps(r), flush=True)
        results.append(r)
    runs = [records(root / f"layout-{r['layout']}") for r in results]
    identical = all([{k: x.get(k) for k in ACCURACY_KEYS} for x in run] ==
                    [{k: x.get(k) for k in ACCURACY_KEYS} for x in runs[0]] for run in runs[1:])
    report = {"machine": {"cores": cores, "memory_gb": round(memory / 1e9, 1)}, "layouts": results,
              "identical_rounds": identical, "date": time.strftime("%Y-%m-%d %H:%M"),
              "load_average_at_end": os.getloadavg()}
    if len(results) > 1:
        report["wall_ratio"] = round(results[1]["wall_s"] / results[0]["wall_s"], 3)
    atomic_write_text(root / "bench_layout.json", json.dumps(report, indent=2) + "\n")
    rows = ["| layout | ranks | wall s | startup s | peak RSS GB | peak PSS GB | console lines | final acc |",
            "|---|---|---|---|---|---|---|---|"]
    rows += [f"| {r['layout']} | {r['ranks']} | {r['wall_s']} | {r['startup_s']} | {r['peak_rss_gb']} | "
             f"{r['peak_pss_gb']} | {r['console_lines']} | {r['final_accuracy']:.4f} |" for r in results]
    rows.append(f"\nPer-round accuracies, losses and bytes identical across layouts: {identical}.")
    atomic_write_text(root / "bench_layout.md", "\n".join(rows) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "layouts"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
