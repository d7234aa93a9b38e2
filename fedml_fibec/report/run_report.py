"""One run's own report: summary.md, the accuracy plots beside its metrics, and the console table."""
from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write_text
from ..metrics import read_jsonl
from .compare import RunResult
from .plots import plot_curves


def result_table(summary: dict) -> str:
    """A short Markdown table of the run's result."""
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)
    return ("| method | rounds | final acc | best acc | device acc | MB up | MB down | wall s |\n"
            "|---|---|---|---|---|---|---|---|\n"
            f"| {summary['method']} | {summary['rounds']} | {fmt(summary['final_accuracy'], '.4f')} | "
            f"{fmt(summary['best_accuracy'], '.4f')} | {fmt(summary['final_device_accuracy'], '.4f')} | "
            f"{summary['total_bytes_up'] / 1e6:.2f} | {summary['total_bytes_down'] / 1e6:.2f} | "
            f"{summary['wall_seconds']:.0f} |\n")


def report_result(out_dir: Path, summary: dict) -> str:
    """Write summary.md and the accuracy plots beside the metrics; return the table and the folder."""
    table = result_table(summary)
    atomic_write_text(out_dir / "summary.md", table)
    run = RunResult(method=summary["method"], seed=summary["config"]["common_args"]["random_seed"],
                    records=read_jsonl(out_dir / "metrics.jsonl"), summary=summary)
    plot_curves([run], out_dir)
    return (f"\n{table}\nresults: {summary['out_dir']} (metrics.jsonl, summary.json, summary.md, accuracy_vs_*.png, "
            "logs/)")
