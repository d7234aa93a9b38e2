"""Accuracy curves of a comparison: against round, wall seconds and MB uploaded, one line per method."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from .compare import RunResult  # noqa: E402

# x axis name -> (label, value of a record given the run's records up to it)
AXES = {
    "round": "round",
    "seconds": "wall seconds",
    "mb_up": "MB uploaded (cumulative)",
}


def _curve(run: RunResult, axis: str) -> tuple[list[float], list[float]]:
    """(x, accuracy) of a run's evaluated rounds on the chosen axis."""
    xs, ys, up = [], [], 0.0
    for r in run.records:
        up += (r.get("bytes_up") or 0) / 1e6
        if r.get("global_accuracy") is None:
            continue
        xs.append({"round": r["round"] + 1, "seconds": r.get("wall_seconds") or 0.0, "mb_up": up}[axis])
        ys.append(r["global_accuracy"])
    return xs, ys


def line_styles(n: int) -> list[dict]:
    """n (colour, line style, marker) combinations, distinct for up to 20 methods."""
    colours = plt.get_cmap("tab20").colors  # 20 colours; tab10 repeats after 10 methods
    dashes = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v"]
    return [{"color": colours[(2 * i) % 20 + (2 * i) // 20 % 2], "linestyle": dashes[i % len(dashes)],
             "marker": markers[i % len(markers)]} for i in range(n)]


def _mean_curve(runs: Sequence[RunResult], axis: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Point-wise mean over seeds, up to the shortest run (x is averaged too), and the seeds' min and max."""
    curves = [_curve(r, axis) for r in runs]
    n = min(len(c[0]) for c in curves)
    xs = [sum(c[0][i] for c in curves) / len(curves) for i in range(n)]
    ys = [sum(c[1][i] for c in curves) / len(curves) for i in range(n)]
    lo = [min(c[1][i] for c in curves) for i in range(n)]
    hi = [max(c[1][i] for c in curves) for i in range(n)]
    return xs, ys, lo, hi


def plot_curves(runs: Sequence[RunResult], out_dir: str | Path, target: float | None = None) -> list[Path]:
    """accuracy_vs_round.png, accuracy_vs_seconds.png, accuracy_vs_mb_up.png; returns the paths."""
    out_dir = Path(out_dir)
    methods = list(dict.fromkeys(r.method for r in runs if r.ok))
    paths = []
    for axis, label in AXES.items():
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for name, style in zip(methods, line_styles(len(methods))):
            mine = [r for r in runs if r.method == name and r.ok]
            xs, ys, lo, hi = _mean_curve(mine, axis)
            if xs:
                ax.plot(xs, ys, markersize=3, linewidth=1.2, label=name + (f" ({len(mine)} seeds)" if len(mine) > 1
                                                                            else ""), **style)
                if len(mine) > 1:  # the band: lowest to highest seed at each point
                    ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
        ax.set_xlabel(label)
        ax.set_ylabel("global test accuracy")
        if axis == "mb_up":
            ax.set_xscale("log")  # methods differ by orders of magnitude in what they send
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 1 2 5 10 20 ...
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
        # Outside the axes: with a dozen methods a legend inside hides the curves.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
        path = out_dir / f"accuracy_vs_{axis}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)  # atomic: a reader never sees half a PNG
        paths.append(path)
    return paths
