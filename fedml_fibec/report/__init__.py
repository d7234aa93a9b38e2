"""Comparison report: read each run's metrics.jsonl / summary.json -> per-method rows -> CSV, Markdown, PNGs.

Pure: nothing here launches runs or imports fedml; it reads the files every run writes.
"""
from .compare import (
    RunResult,
    compare_rows,
    load_runs,
    target_accuracy,
    write_csv,
    write_markdown,
)
from .plots import plot_curves

__all__ = ["RunResult", "compare_rows", "load_runs", "plot_curves", "target_accuracy", "write_csv",
           "write_markdown"]
