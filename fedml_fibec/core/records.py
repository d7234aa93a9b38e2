"""A round's record and its progress line, the same for both engines (so their reports compare)."""
from __future__ import annotations

import logging
import time
from typing import Iterable, Optional

from ..metrics import MetricsLog

log = logging.getLogger("fedml_fibec")

# Mean seconds per device spent on each part of local work (where the time goes): wall seconds, and the
# CPU seconds of the thread doing the work (robust to other processes sharing the cores).
DEVICE_CLOCKS = ("scoring_seconds", "train_seconds", "eval_seconds", "scoring_cpu_seconds", "train_cpu_seconds")
# Mean local work per device: optimizer steps and samples drawn (the cost measure that is not seconds).
DEVICE_WORK = ("local_steps", "samples_seen")


def mean(values: Iterable) -> Optional[float]:
    """Mean of the values that are not None (None when there are none)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def round_record(round_idx: int, stats: list[dict], *, devices: list[int], bytes_up: int, bytes_down: int,
                 gal: list[int], rejected: int = 0) -> dict:
    """The per-round fields of FIBECFED.md section 7 from the accepted devices' statistics."""
    return {
        "round": round_idx,
        "train_loss": mean(s.get("train_loss") for s in stats),
        "device_accuracy": mean(s.get("device_accuracy") for s in stats),
        "personal_accuracy": mean(s.get("personal_accuracy") for s in stats),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "curriculum_share": mean(s.get("curriculum_share", 1.0) for s in stats),
        "gal": list(gal),
        "updated_neuron_share": mean(s.get("updated_neuron_share") for s in stats),
        "num_devices": len(stats),
        "devices": list(devices),
        "rejected_payloads": rejected,
        **{k: mean(s.get(k) for s in stats) for k in DEVICE_CLOCKS + DEVICE_WORK},
    }


class RoundClock:
    """Closes each round's record: wall and round seconds, then writes it and logs the progress line."""

    def __init__(self, metrics: MetricsLog):
        self.metrics = metrics
        self.round_started = time.time()

    def restart(self) -> None:
        self.round_started = time.time()

    def close(self, record: dict) -> dict:
        now = time.time()
        record.update(wall_seconds=now - self.metrics.started, round_seconds=now - self.round_started)
        self.round_started = now
        written = self.metrics.add(record)
        log.info("%s", progress_line(record, self.metrics.total_rounds, self.metrics.eta_seconds()),
                 extra={"console": True})
        return written


def progress_line(record: dict, total: int, eta: Optional[float]) -> str:
    """`round r/T  acc ..  [val acc ..]  device acc ..  loss ..  up .. MB  ..s/round  ETA mm:ss`."""
    def fmt(x, spec="{:.4f}"):
        return "-" if x is None else spec.format(x)
    val = f"val acc {fmt(record['val_accuracy'])}  " if "val_accuracy" in record else ""
    return (f"round {record['round'] + 1}/{total}  acc {fmt(record.get('global_accuracy'))}  {val}"
            f"device acc {fmt(record.get('device_accuracy'))}  loss {fmt(record.get('train_loss'))}  "
            f"up {record['bytes_up'] / 1e6:.2f} MB  {record['round_seconds']:.1f}s/round  "
            f"ETA {'-' if eta is None else time.strftime('%M:%S', time.gmtime(eta))}")
