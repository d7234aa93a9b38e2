#!/usr/bin/env python3
"""One table for runs made by several comparison commands (e.g. an ablation of FibecFed's options).

compare_baselines.py applies its `--set` overrides to every method, so variants of one method live in
separate comparison folders. This script reads `<folder>/<method>/seed<k>/` runs from each, labels
them, and writes compare.md, compare.csv and the accuracy plots with the same columns and the same
target rule as compare_baselines.py. It copies each run's small result files (metrics.jsonl,
summary.json, run.json) next to the table, so the numbers can be checked without the run folders.

    python run_scripts/collect_variants.py --out docs/results/ablation_mr \\
        --run "FedAvg-LoRA=/work/study/mr/FedAvg-LoRA" --run "scored GAL=/work/study/a/FibecFed"
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedml_fibec.report.compare import (  # noqa: E402
    compare_rows, load_runs, target_accuracy, write_csv, write_markdown,
)
from fedml_fibec.report.plots import plot_curves  # noqa: E402

KEPT = ("metrics.jsonl", "summary.json", "run.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for compare.md, compare.csv, the plots and the copies")
    p.add_argument("--run", action="append", required=True, metavar="LABEL=METHOD_FOLDER",
                   help="a label and a <comparison>/<method> folder holding seed<k>/ runs; repeatable")
    p.add_argument("--reference", default="FedAvg-LoRA", help="label whose best accuracy sets the target")
    p.add_argument("--target-fraction", type=float, default=0.95, help="target = this share of its best")
    p.add_argument("--header", default="", help="Markdown put above the table (e.g. the commands)")
    ns = p.parse_args(argv)
    ns.pairs = []
    for text in ns.run:
        label, sep, folder = text.partition("=")
        if not sep or not label.strip() or "/" in label:
            p.error(f"--run {text!r}: expected LABEL=FOLDER with a label without '/'")
        path = Path(folder)
        if not sorted(path.glob("seed*/metrics.jsonl")):
            p.error(f"--run {text!r}: no seed*/metrics.jsonl under {path}")
        ns.pairs.append((label.strip(), path))
    return ns


def main(argv=None) -> int:
    ns = parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for label, folder in ns.pairs:
        for run in load_runs(folder.parent, [folder.name]):
            run.method = label
            runs.append(run)
        for seed_dir in sorted(folder.glob("seed*")):
            dest = out / re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") / seed_dir.name
            dest.mkdir(parents=True, exist_ok=True)
            for name in KEPT:
                if (seed_dir / name).is_file():
                    shutil.copyfile(seed_dir / name, dest / name)
    target, note = target_accuracy(runs, reference=[ns.reference], fraction=ns.target_fraction)
    rows = compare_rows(runs, target)
    write_csv(rows, out / "compare.csv")
    write_markdown(rows, out / "compare.md", target, note, ns.header, runs=runs)
    plot_curves(runs, out, target)
    print(f"wrote {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
