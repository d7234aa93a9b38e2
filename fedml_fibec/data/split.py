"""Seeded, stratified train/test splits and subsamples of a TextTable."""
from __future__ import annotations

import numpy as np

from fedml_fibec.data.sources import TextTable
from fedml_fibec.errors import ConfigError, DataError


def stratified_split(table: TextTable, *, test_fraction: float, seed: int) -> tuple[TextTable, TextTable]:
    """Split into (train, test), taking round(test_fraction * n_c) of every class c into test."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    labels = np.asarray(table.labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test_idx: list[np.ndarray] = []
    for c in np.unique(labels):  # sorted classes: the rng draws in a fixed order
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        k = int(round(n * test_fraction))
        if n >= 2:  # both sides see every class that has at least two examples
            k = min(max(k, 1), n - 1)
        else:
            k = 0
        test_idx.append(idx[:k])
    test = np.sort(np.concatenate(test_idx)) if test_idx else np.empty(0, np.int64)
    if len(test) == 0 or len(test) == len(labels):
        raise DataError(f"stratified_split: {len(labels)} rows with test_fraction={test_fraction} leave an empty side")
    mask = np.ones(len(labels), dtype=bool)
    mask[test] = False
    return table.subset(np.flatnonzero(mask)), table.subset(test)


def stratified_sample_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of exactly n rows whose class counts are proportional to labels' (largest remainder)."""
    labels = np.asarray(labels, dtype=np.int64)
    if n >= len(labels):
        return np.arange(len(labels))
    if n <= 0:
        raise ConfigError(f"max_train_samples must be positive, got {n}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n / len(labels))
    quota = np.floor(exact).astype(np.int64)
    # Hand the leftover rows to the largest fractional parts (ties: lower class id, stable sort).
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def stratified_subsample(table: TextTable, n: int, *, seed: int) -> TextTable:
    """A seeded class-proportional subsample of n rows (the whole table if n >= len)."""
    return table.subset(stratified_sample_indices(np.asarray(table.labels), n, seed))
