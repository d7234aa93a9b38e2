"""How many client processes this machine should start for a config (run_scripts/run_main.sh asks).

FedML's layout is one process per device slot: 1 + client_num_per_round ranks. Each rank holds its
own Python, torch, FedML and model (about 1.8 GB for the embedded default, docs/PERFORMANCE.md), so
on a small machine fewer client processes, each serving several of the round's devices one after
another, run the same training (identical results) in much less memory and no slower. The
automatic layout keeps FedML's where the cores and memory allow it.

    python3 -m fedml_fibec.layout [--cf F] [--set K=V ...] [--np N]   ->  prints "NP WORKERS"
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .config import RunConfig, load_config
from .errors import FibecError

RANK_MEMORY_BYTES = 2 * 1024**3  # budget per rank: measured 1.6-1.8 GB RSS for MiniLM, with headroom


def machine() -> tuple[int, int]:
    """(cores, memory bytes) of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan(cfg: RunConfig, cores: int, memory: int, np_forced: Optional[int] = None) -> tuple[int, str]:
    """(client processes, one line saying why) for this config on a machine of `cores` and `memory`."""
    per_round = cfg.train_args.client_num_per_round
    if cfg.device_args.worker_num is not None:
        return cfg.device_args.worker_num, f"worker_num = {cfg.device_args.worker_num} from the config"
    if np_forced is not None:
        return np_forced - 1, f"NP={np_forced}: 1 server + {np_forced - 1} client processes"
    fits = min(cores, memory // RANK_MEMORY_BYTES - 1)
    if fits >= per_round or cfg.common_args.training_type == "simulation":
        return per_round, f"{per_round + 1} ranks (1 server + one process per device slot)"
    workers = max(1, fits)
    return workers, (f"this machine ({cores} cores, {memory / 1024**3:.0f} GB) runs 1 server + {workers} client "
                     f"process(es), each serving about {per_round / workers:.0f} of the {per_round} devices per "
                     f"round in turn (same results as {per_round + 1} ranks; NP={per_round + 1} forces that layout)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Print 'NP WORKERS' for mpirun on this machine.")
    p.add_argument("--cf")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--np", type=int, help="forced process count (the NP environment variable)")
    ns, _ = p.parse_known_args(argv)  # run_fibec.py's other arguments are not ours
    try:
        cfg = load_config(ns.cf, ns.overrides)
    except FibecError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if ns.np is not None and ns.np < 2:
        print(f"NP={ns.np}: expected at least 2 (1 server + 1 client process)", file=sys.stderr)
        return 2
    workers, why = plan(cfg, *machine(), np_forced=ns.np)
    print(f"layout: {why}", file=sys.stderr)
    print(workers + 1, workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
