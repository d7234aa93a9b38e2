"""Seeds every process derives the same way, so any process (or engine) trains the same thing.

A device's batches continue its own generator (kept in its state), dropout is seeded by device
and round, the devices of a round are one seeded draw, and every device is evaluated on the same
seeded subset of the global test set: results do not depend on which process serves a device.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ..data import EncodedSet


def derived_seed(*parts: Any) -> int:
    """A stable 63-bit seed from the run seed and identifiers (same on every host and process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_devices(seed: int, round_idx: int, total: int, per_round: int) -> list[int]:
    """The devices of a training round: a seeded draw without replacement, the same for every method."""
    if total == per_round:
        return list(range(total))
    rng = np.random.RandomState(derived_seed(seed, "sample", round_idx) % (2**32))
    return sorted(int(i) for i in rng.choice(total, per_round, replace=False))


def device_generator(state: dict, seed: int, device_id: int) -> torch.Generator:
    """The device's batch generator: continued from its state, or seeded at its first round."""
    generator = torch.Generator()
    if "rng" in state:
        generator.set_state(state["rng"])
    else:
        generator.manual_seed(derived_seed(seed, "device", device_id))
    return generator


def seed_dropout(seed: int, device_id: int, round_idx: int) -> None:
    """Seed torch's global generator (dropout) for one device's round."""
    torch.manual_seed(derived_seed(seed, "dropout", device_id, round_idx))


def device_eval_subset(test: EncodedSet, n: int, seed: int) -> EncodedSet:
    """The seeded global-test subsample every device evaluates its own model on."""
    n = min(len(test), n)
    g = torch.Generator().manual_seed(derived_seed(seed, "device_eval"))
    return test.subset(torch.randperm(len(test), generator=g)[:n].sort().values)
