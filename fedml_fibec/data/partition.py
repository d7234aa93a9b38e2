"""Split sample indices over devices: IID or Dirichlet label skew, with a minimum per device."""
from __future__ import annotations

import heapq

import numpy as np

from fedml_fibec.errors import ConfigError, DataError

METHODS = ("iid", "dirichlet")
ALIASES = {"homo": "iid", "hetero": "dirichlet"}  # FedML's names for the same two schemes
MAX_TRIES = 100


def partition_indices(
    labels: np.ndarray,
    num_devices: int,
    *,
    method: str,
    alpha: float,
    min_samples: int,
    seed: int,
) -> list[np.ndarray]:
    """Sorted int64 index arrays, one per device, using every sample exactly once; deterministic per seed."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    method = ALIASES.get(method, method)
    if method not in METHODS:
        raise ConfigError(f"partition_method must be one of {list(METHODS) + list(ALIASES)}, got {method!r}")
    if int(num_devices) < 1:
        raise ConfigError(f"num_devices must be >= 1, got {num_devices!r}")
    if int(min_samples) < 0:
        raise ConfigError(f"min_samples_per_device must be >= 0, got {min_samples!r}")
    if num_devices * min_samples > n:
        raise DataError(
            f"cannot give num_devices={num_devices} devices min_samples_per_device={min_samples} samples each: "
            f"{num_devices}*{min_samples}={num_devices * min_samples} > {n} training samples; "
            f"lower num_devices (client_num_in_total) or min_samples_per_device"
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(n), num_devices)
        return [np.sort(p).astype(np.int64) for p in parts]
    if not float(alpha) > 0:
        raise ConfigError(f"partition_alpha must be > 0 for the Dirichlet partition, got {alpha!r}")
    parts = []
    for _ in range(MAX_TRIES):
        parts = _dirichlet_once(labels, num_devices, float(alpha), rng)
        if min(len(p) for p in parts) >= min_samples:
            break
    else:
        parts = _top_up(parts, min_samples)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_once(labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    """One draw of FedML's non_iid_partition_with_dirichlet_distribution (per class ~ Dir(alpha))."""
    n = len(labels)
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for c in np.unique(labels):
        idx_c = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_devices, alpha))
        # FedML/FedPepTAO: devices already holding >= N/K samples take no more of this class.
        p = p * np.array([len(d) < n / num_devices for d in parts])
        p = p / p.sum() if p.sum() > 0 else np.full(num_devices, 1.0 / num_devices)
        cuts = (np.cumsum(p) * len(idx_c)).astype(int)[:-1]
        for d, chunk in enumerate(np.split(idx_c, cuts)):
            parts[d].extend(chunk.tolist())
    return parts


def _top_up(parts: list[list[int]], min_samples: int) -> list[list[int]]:
    """Move samples from the largest devices to those under min_samples, deterministically."""
    parts = [list(p) for p in parts]
    # Max-heap of (size, device); ties broken by lower device id.
    heap = [(-len(p), d) for d, p in enumerate(parts)]
    heapq.heapify(heap)
    for d in range(len(parts)):
        while len(parts[d]) < min_samples:
            while True:  # skip stale heap entries
                neg, donor = heapq.heappop(heap)
                if -neg == len(parts[donor]):
                    break
            if donor == d or len(parts[donor]) <= min_samples:
                raise DataError(f"internal: cannot top up device {d} to {min_samples} samples")  # pragma: no cover
            parts[d].append(parts[donor].pop())
            heapq.heappush(heap, (-len(parts[donor]), donor))
            heapq.heappush(heap, (-len(parts[d]), d))
    return parts
