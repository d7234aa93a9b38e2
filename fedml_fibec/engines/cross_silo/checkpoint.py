"""Server checkpoints: the global state after each completed exchange, written atomically.

`<out>/checkpoint.pt` holds everything the server needs to continue (`--resume <out>`): the
aggregator's state (round, phase, global tensors, GAL, layer scores, byte carry), the metrics
records so far and the elapsed time, the device sampler's position, the silos still taking part,
and the torch / numpy / python RNG states. `<out>/checkpoint.json` is a small readable summary of
the same point. Devices keep their own state in their store (FIBECFED.md section 5), with the
per-device backup of engines/cross_silo/client_manager.DeviceLedger for a repeated exchange.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ...atomic import atomic_write, atomic_write_text
from ...config import RunConfig, config_differences
from ...errors import ConfigError

CHECKPOINT = "checkpoint.pt"
VERSION = 2  # 2: the server round's state (no per-round download bytes)



def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT


def save(out_dir: Path, *, aggregator, metrics, exchanges_done: int, fedml_rounds: int, sampler_next: int,
         active_silos: list[int], cfg: RunConfig) -> dict:
    """Write the state after `exchanges_done` exchanges (of `fedml_rounds`) atomically."""
    agg = aggregator.state_dict()
    state = {
        "version": VERSION,
        "exchanges_done": exchanges_done,
        "fedml_rounds": fedml_rounds,
        "aggregator": agg,
        "metrics_records": list(metrics.records),
        "elapsed_seconds": time.time() - metrics.started,
        "sampler_next": sampler_next,
        "active_silos": list(active_silos),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "config": cfg.to_sections(),
        "saved_at": time.time(),
    }
    atomic_write(checkpoint_path(out_dir), lambda fh: torch.save(state, fh))
    summary = {"exchanges_done": exchanges_done, "fedml_rounds": fedml_rounds, "rounds_done": agg["round"],
               "comm_round": cfg.train_args.comm_round, "phase": agg["phase"], "gal": agg["gal"],
               "active_silos": list(active_silos), "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
               "complete": exchanges_done >= fedml_rounds}
    atomic_write_text(Path(out_dir) / "checkpoint.json", json.dumps(summary, indent=2) + "\n")
    return state


def load(out_dir: str | Path) -> Optional[dict]:
    """The checkpoint in out_dir, or None when the run never completed an exchange."""
    p = checkpoint_path(out_dir)
    if not p.exists():
        return None
    state = torch.load(p, map_location="cpu", weights_only=False)
    if state.get("version") != VERSION:
        raise ConfigError(f"{p}: checkpoint version {state.get('version')} is not {VERSION}")
    return state


def restore(state: dict, *, aggregator, metrics) -> None:
    """Put the server back at the checkpoint: aggregator, metrics, RNG states."""
    aggregator.load_state_dict(state["aggregator"])
    metrics.records = list(state["metrics_records"])
    metrics.started = time.time() - state["elapsed_seconds"]
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])


def check_same_config(cfg: RunConfig, saved: dict[str, dict[str, Any]], where: str) -> None:
    """Resuming with another config would not continue the same run: name the keys that differ."""
    # Only the placement keys (config.PLACEMENT_KEYS) may differ from the run's config.yaml.
    diffs = config_differences(cfg, saved)
    if diffs:
        raise ConfigError(f"--resume {where}: the config differs from the run being resumed in "
                          f"{'; '.join(diffs)}. Resume with the run's own config.yaml (leave out --cf).")
