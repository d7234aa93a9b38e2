#!/usr/bin/env python
"""Matrix products with subnormal inputs on this CPU, with and without device_args.flush_denormal.

    python benchmarks/bench_subnormal.py [--rows 512] [--hidden 768] [--repeats 20] [--quick]

A float32 below 1.18e-38 is subnormal; x86 cores compute with it in microcode, many times slower. In
training, such values come from saturated outputs: a softmax whose losing classes sit far below the
winning one gives gradients of that size, and every backward matrix product that reads them slows down.
This times `A @ B` (A: rows x hidden, B: hidden x hidden, one torch thread, as each client rank of
the main job on a small machine) for A normal (about 1e-3) and subnormal (about 1e-40), with the flush
mode off and on, and prints one JSON line per case (median seconds of one product over the repeats,
and the share of A @ B that is exactly zero). One thread only: the flush mode is a per-thread flag that
a thread pool's threads copy when they start, so toggling it inside one process times the pool's old mode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def time_product(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats (a smoke test)")
    args = p.parse_args()
    if args.quick:
        args.rows, args.hidden, args.repeats = 64, 64, 3
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    b = torch.randn(args.hidden, args.hidden, generator=g)
    uniform = torch.rand(args.rows, args.hidden, generator=g) + 0.5
    inputs = {"normal": uniform * 1e-3, "subnormal": uniform * 1e-40}
    if not torch.set_flush_denormal(False):
        print(json.dumps({"error": "this CPU cannot flush subnormal floats (no x86 DAZ flag)"}))
        return
    baseline = None
    try:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            for name, a in inputs.items():
                s = time_product(a, b, args.repeats)
                baseline = baseline or s
                print(json.dumps({"input": name, "flush_denormal": flush, "rows": args.rows, "hidden": args.hidden,
                                  "median_s": round(s, 6), "x_normal_unflushed": round(s / baseline, 1),
                                  "zero_share": round(float(((a @ b) == 0).float().mean()), 4)}), flush=True)
    finally:
        torch.set_flush_denormal(False)


if __name__ == "__main__":
    main()
