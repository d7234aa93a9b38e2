"""Per-round records and run summaries, written atomically as JSONL / JSON."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

ROUND_KEYS = (
    "round", "method", "wall_seconds", "round_seconds", "train_loss", "global_accuracy", "device_accuracy",
    "bytes_up", "bytes_down", "curriculum_share", "gal", "updated_neuron_share", "num_devices",
    "rejected_payloads",
)

# "Final" accuracies are the mean of the last FINAL_ROUNDS evaluated rounds, because one round's accuracy
# swings by 5-15 points. The tuning score (val_accuracy_last3: the name is a saved file's key) and the
# rounds a tuning run evaluates (compare.TUNING_RUN_OVERRIDES) use the same window.
FINAL_ROUNDS = 3


def mean_of_last_rounds(values: list[float]) -> float | None:
    """Mean of the last FINAL_ROUNDS values (of fewer if there are fewer), None if there are none."""
    tail = values[-FINAL_ROUNDS:]
    return sum(tail) / len(tail) if tail else None


def _clean(value: Any) -> Any:
    """JSON-safe value: NaN/inf become None, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class MetricsLog:
    """Collects round records; rewrites metrics.jsonl atomically after each round."""

    def __init__(self, out_dir: str | os.PathLike, method: str, total_rounds: int):
        self.out_dir = Path(out_dir)
        self.method = method
        self.total_rounds = total_rounds
        self.records: list[dict[str, Any]] = []
        self.started = time.time()

    @property
    def path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one round's record (keys of ROUND_KEYS first) and persist the whole log."""
        record = {"method": self.method, **record}
        ordered = {k: record[k] for k in ROUND_KEYS if k in record}
        ordered.update({k: v for k, v in record.items() if k not in ordered})
        self.records.append(_clean(ordered))
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        return self.records[-1]

    def eta_seconds(self) -> float | None:
        """Remaining time from the mean round time so far."""
        if not self.records:
            return None
        done = len(self.records)
        return (time.time() - self.started) / done * (self.total_rounds - done)

    def summary(self, config_sections: dict, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run summary: final and best accuracy, bytes, wall time, resolved config."""
        accs = [r["global_accuracy"] for r in self.records if r.get("global_accuracy") is not None]
        dev = [r["device_accuracy"] for r in self.records if r.get("device_accuracy") is not None]
        return _clean({
            "method": self.method,
            "rounds": len(self.records),
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "final_device_accuracy": dev[-1] if dev else None,
            **self._validation_summary(),
            "total_bytes_up": sum(r.get("bytes_up", 0) for r in self.records),
            "total_bytes_down": sum(r.get("bytes_down", 0) for r in self.records),
            "wall_seconds": time.time() - self.started,
            **(extra or {}),
            "config": config_sections,
        })

    def _validation_summary(self) -> dict[str, Any]:
        """Validation accuracy (runs with a validation split): final, best, and the mean of the last
        FINAL_ROUNDS evaluated rounds, the score settings are chosen by."""
        vals = [r["val_accuracy"] for r in self.records if r.get("val_accuracy") is not None]
        if not vals:
            return {}
        return {"final_val_accuracy": vals[-1], "best_val_accuracy": max(vals),
                "val_accuracy_last3": mean_of_last_rounds(vals)}

    def write_summary(self, config_sections: dict, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write summary.json atomically and return it."""
        summary = self.summary(config_sections, extra)
        atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
