"""Tuning a comparison's methods on the validation split: a plain grid per method, read from YAML.

The grid file maps a method of the comparison to the values of its sensitive config keys:

    FedML-FedProx:
      learning_rate: [0.001, 0.002, 0.005]
      fedprox_mu: [0.001, 0.01, 0.1]

Every point of a method's grid (the cartesian product of its lists, in file order) is one run at
the tuning seed; the point with the best score is the method's setting, then run with every seed.
The score is the mean validation accuracy of the last three evaluated rounds
(`val_accuracy_last3` of summary.json), so the runs must hold out a validation split
(`validation_fraction` > 0); the test accuracy is reported and never read here. Ties go to the
point listed first. A plain grid (not a search library) because the grids are small, every point
is a folder a person can open, and resuming is the comparison's own: a finished run is skipped.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from .errors import ConfigError

SCORE_KEY = "val_accuracy_last3"


@dataclass(frozen=True)
class GridPoint:
    """One setting of a method: config keys and values, in grid order."""

    method: str
    values: tuple[tuple[str, Any], ...]

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={_yaml_value(v)}" for k, v in self.values]

    @property
    def slug(self) -> str:
        """A folder name that says the setting: 'learning_rate=0.001,fedprox_mu=0.01' ('default' if empty)."""
        if not self.values:
            return "default"
        return ",".join(f"{k}={re.sub(r'[^A-Za-z0-9.+-]', '_', _yaml_value(v))}" for k, v in self.values)


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def load_grid(path: str | Path, methods: Sequence[str]) -> dict[str, list[GridPoint]]:
    """Every method's grid points from the YAML file; a method the file does not name gets one point (its
    defaults). Methods the file names that are not in `methods` are ignored; keys are checked by the caller."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"--tune {p}: cannot read the grid file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--tune {p}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--tune {p}: expected a mapping of method -> {{key: [values]}}")
    grids: dict[str, list[GridPoint]] = {}
    for method in methods:
        spec = raw.get(method) or {}
        if not isinstance(spec, dict):
            raise ConfigError(f"--tune {p}: {method}: expected a mapping of config key -> list of values")
        keys, lists = [], []
        for key, values in spec.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"--tune {p}: {method}.{key}: expected a non-empty list of values, got {values!r}")
            if len(set(map(repr, values))) != len(values):
                raise ConfigError(f"--tune {p}: {method}.{key}: a value is listed twice")
            keys.append(str(key))
            lists.append(values)
        grids[method] = [GridPoint(method, tuple(zip(keys, combo))) for combo in itertools.product(*lists)]
    return grids


def score_of(summary: Optional[Mapping[str, Any]]) -> Optional[float]:
    """The tuning score of a finished run (None if it has none: failed, or no validation split)."""
    if not summary:
        return None
    v = summary.get(SCORE_KEY)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def choose(points: Sequence[GridPoint], scores: Sequence[Optional[float]]) -> Optional[int]:
    """Index of the best-scoring point (first on ties), None if no point has a score."""
    best = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > scores[best] + _TIE):
            best = i
    return best


# A score is a mean of accuracies k/n (n examples): two means equal in exact arithmetic can differ in a
# float's last bit (0.7983333333333332 against ...33 on stackoverflow), which would break "first on ties"
# by rounding. Unequal means of three such accuracies differ by at least 1/(3n), over 3e-7 for any
# validation split under a million examples, so a 1e-9 margin merges exact ties only.
_TIE = 1e-9


# Keys whose null means another key's value (config schema: head_learning_rate null = learning_rate). The
# edge check reads the value a run used, so [null, 0.01] over learning rates up to 0.005 tries head rates up
# to 0.01, and 0.01 winning is the top of that range.
NULL_MEANS = {"head_learning_rate": "learning_rate"}


def _effective(values: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """A point's values with each NULL_MEANS key's null replaced by the value it stands for."""
    d = dict(values)
    return {k: d.get(NULL_MEANS[k]) if v is None and k in NULL_MEANS else v for k, v in d.items()}


def range_edges(points: Sequence[GridPoint], best: int) -> list[str]:
    """The chosen point's values that are the lowest or highest number its key's range tries, e.g.
    ['learning_rate=0.01 (the highest tried)'], reading a null of NULL_MEANS as the value it stands for. The
    best setting may then lie outside the range: extend the grid that way (a rerun runs only the new points).
    Keys with fewer than two numbers tried are no edge."""
    edges = []
    used = [_effective(p.values) for p in points]
    for key, value in used[best].items():
        tried = {u[key] for u in used if isinstance(u.get(key), (int, float)) and not isinstance(u[key], bool)}
        if len(tried) < 2 or value not in tried:
            continue
        side = "highest" if value == max(tried) else "lowest" if value == min(tried) else None
        if side is None:
            continue
        # a null that stands for another key's value is shown as written, with the value it meant
        if dict(points[best].values)[key] is None:
            edges.append(f"{key}=null (= {_yaml_value(value)}, the {side} tried)")
        else:
            edges.append(f"{key}={_yaml_value(value)} (the {side} tried)")
    return edges


def read_summary(folder: Path) -> Optional[dict]:
    p = folder / "summary.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def read_choices(folder: str | Path, methods: Sequence[str]) -> dict[str, list[str]]:
    """The setting a finished tuning chose for each method: `<folder>/tuning/choices.json` of a tuned comparison.

    For running the chosen settings again elsewhere (e.g. every method's seeds under one condition, for
    timings). A method whose grid has not fully run has no final choice, so it is an error, not a guess.
    """
    path = Path(folder) / "tuning" / "choices.json"
    try:
        choices = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {path} (expected the --out folder of a comparison run with --tune)") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(choices, dict):
        raise ConfigError(f"{path} is not a method -> choice mapping (as compare_baselines.py --tune writes it)")
    settings: dict[str, list[str]] = {}
    for method in methods:
        c = choices.get(method) or {}
        if c.get("setting") is None:
            tuned = [m for m, x in choices.items() if isinstance(x, dict) and x.get("setting") is not None]
            raise ConfigError(f"{path} has no chosen setting for {method} (tuned there: {', '.join(tuned) or 'none'})")
        if c.get("points_run") != c.get("points_total"):
            raise ConfigError(f"{method}'s tuning in {path} is not finished ({c.get('points_run')}/"
                              f"{c.get('points_total')} grid points run): its best point is not a final choice")
        settings[method] = list(c["setting"])
    return settings
