#!/usr/bin/env python
"""run_scripts/run_fibec.py with timers: what bench_round.py launches under mpirun (one process per rank).

Same command line as run_fibec.py (--out is required). Before the run starts (after the runner has set
up the offline environment, so FedML still finds its home under the run folder) it wraps, without
changing what they do:
  client  FibecClientTrainer.train / ._difficulty_order / ._layer_scores, train_steps, evaluate,
          DeviceStateStore.load / .save, to_wire
  server  FibecServerAggregator.aggregate / .test, evaluate, to_wire
  both    the MPI transport's send_message, and mpi4py's pickle dumps / loads (serialization, bytes)
Each call becomes one JSON line in <out>/bench_timing/rank<R>.jsonl: kind, start (time.time()), seconds,
round and phase where known, bytes for pickling. At the end each rank adds its peak resident memory
(getrusage) and, on CUDA, torch.cuda.max_memory_allocated. `bench_round.py analyze <out>` reads them.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedml_fibec import runner  # noqa: E402  (imports no fedml)


class Recorder:
    def __init__(self, path: Path, rank: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a", buffering=1)
        self.rank = rank
        self.lock = threading.Lock()
        self.context: dict = {}

    def write(self, record: dict) -> None:
        with self.lock:
            self.fh.write(json.dumps({"rank": self.rank, **record}) + "\n")

    def event(self, kind: str, start: float, seconds: float, **extra) -> None:
        self.write({"kind": kind, "start": start, "seconds": seconds, **self.context, **extra})


REC: Recorder | None = None


def timed(kind: str, fn, before=None):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if before is not None:
            before(*args)
        wall, t0 = time.time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            REC.event(kind, wall, time.perf_counter() - t0)
    return wrapper


def install(out_dir: Path, rank: int) -> None:
    global REC
    REC = Recorder(out_dir / "bench_timing" / f"rank{rank}.jsonl", rank)

    from mpi4py import MPI

    def dumps(obj, *args, **kwargs):
        wall, t0 = time.time(), time.perf_counter()
        data = pickle.dumps(obj, *args, **kwargs)
        REC.event("pickle_dumps", wall, time.perf_counter() - t0, nbytes=len(data))
        return data

    def loads(data, *args, **kwargs):
        wall, t0 = time.time(), time.perf_counter()
        obj = pickle.loads(data, *args, **kwargs)
        REC.event("pickle_loads", wall, time.perf_counter() - t0, nbytes=len(data))
        return obj

    MPI.pickle.__init__(dumps, loads)

    from fedml_fibec.core import device_round as dr_mod
    from fedml_fibec.core import server_round as sr_mod
    from fedml_fibec.core import state_store
    from fedml_fibec.engines.cross_silo import aggregator as agg_mod
    from fedml_fibec.fedml_glue import mpi_transport

    def client_context(self, download, *args):
        REC.context = {"round": download.round, "phase": download.phase}

    T = dr_mod.DeviceRound
    T.run = timed("client_train", T.run, before=client_context)
    T._difficulty_order = timed("scoring_difficulty", T._difficulty_order)
    T._layer_scores = timed("scoring_layers", T._layer_scores)
    dr_mod.train_steps = timed("local_compute", dr_mod.train_steps)
    dr_mod.evaluate = timed("device_eval", dr_mod.evaluate)
    dr_mod.to_wire = timed("to_wire", dr_mod.to_wire)
    S = state_store.DeviceStateStore
    S.load = timed("state_io", S.load)
    S.save = timed("state_io", S.save)

    A = agg_mod.FibecServerAggregator

    def server_context(self, *args):
        REC.context = {"round": self.server_round.round, "phase": self.server_round.phase}

    A.aggregate = timed("aggregate", A.aggregate, before=server_context)
    sr_mod.evaluate = timed("server_eval", sr_mod.evaluate)
    sr_mod.to_wire = timed("to_wire", sr_mod.to_wire)
    original_test = A.test

    def test(self, *args, **kwargs):
        wall, t0 = time.time(), time.perf_counter()
        pending = self._record
        try:
            return original_test(self, *args, **kwargs)
        finally:
            REC.event("server_test", wall, time.perf_counter() - t0)
            if pending is not None:
                REC.write({"kind": "round_end", "start": time.time(), "round": pending["round"]})
    A.test = test
    Q = mpi_transport.QuietMpiCommunicationManager
    Q.send_message = timed("mpi_send", Q.send_message)


def finish() -> None:
    if REC is None:
        return
    record = {"kind": "peak", "start": time.time(),
              "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        record["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        record["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    REC.write(record)


def main() -> int:
    argv = sys.argv[1:]
    if "--out" not in argv:
        print("round_rank.py: --out DIR is required", file=sys.stderr)
        return 2
    out_dir = Path(argv[argv.index("--out") + 1]).resolve()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    original_run = runner.run

    def run(*args, **kwargs):  # runner.run's arguments pass through untouched, whatever they are
        world = kwargs.get("world", args[-1] if args else None)
        install(out_dir, getattr(world, "rank", rank))
        REC.write({"kind": "start", "start": time.time()})
        try:
            return original_run(*args, **kwargs)
        finally:
            finish()

    runner.run = run
    return runner.main(argv)


if __name__ == "__main__":
    sys.exit(main())
