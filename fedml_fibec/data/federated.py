"""From a source to per-device encoded data and FedML's 8-element dataset list."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedml_fibec.data.encode import EncodedSet, encode_cached
from fedml_fibec.data.partition import partition_indices
from fedml_fibec.data.sources import BUILTIN, TextTable, load_builtin, load_files, load_hub
from fedml_fibec.data.tasks import PAPER_TASKS, load_task
from fedml_fibec.data.split import stratified_split, stratified_subsample
from fedml_fibec.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("builtin", "files", "hub")


@dataclass
class DeviceData:
    """One device's examples; FedML hands this to the trainer, so it carries the device id (-1 = global)."""

    device_id: int
    data: EncodedSet
    heldout: EncodedSet | None = None  # the device's own held-out samples (personalised accuracy)

    def __len__(self) -> int:
        return len(self.data)


@dataclass
class FederatedData:
    """Per-device training sets, the global test set and the class names."""

    train: list[DeviceData]
    test: EncodedSet
    num_classes: int
    label_names: list[str]
    validation: EncodedSet | None = None  # held out on the server; no device holds any of it

    @property
    def train_num(self) -> int:
        """Total number of training examples over all devices."""
        return sum(len(d) for d in self.train)

    @property
    def test_majority_share(self) -> float:
        """Accuracy of always answering the test set's largest class (what a stuck model scores)."""
        counts = torch.bincount(self.test.labels, minlength=self.num_classes)
        return float(counts.max()) / max(1, len(self.test))

    def stats(self) -> dict[str, Any]:
        """Per-device sizes and label counts plus a summary, JSON-serialisable (for the log)."""
        sizes = [len(d) for d in self.train]
        counts = [torch.bincount(d.data.labels, minlength=self.num_classes).tolist() for d in self.train]
        return {
            "num_devices": len(self.train),
            "num_classes": self.num_classes,
            "label_names": list(self.label_names),
            "train_num": sum(sizes),
            "test_num": len(self.test),
            "validation_num": 0 if self.validation is None else len(self.validation),
            "seq_len": self.test.seq_len,
            "size_min": min(sizes) if sizes else 0,
            "size_median": float(np.median(sizes)) if sizes else 0.0,
            "size_max": max(sizes) if sizes else 0,
            "train_label_counts": np.sum(counts, axis=0).tolist() if counts else [0] * self.num_classes,
            "test_label_counts": torch.bincount(self.test.labels, minlength=self.num_classes).tolist(),
            "device_sizes": sizes,
            "device_label_counts": counts,
        }


def load_source(
    *,
    source: str,
    dataset: str,
    cache_dir: str | os.PathLike | None = None,
    train_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    hub_config: str | None = None,
    task_copy: str | os.PathLike | None = None,
) -> tuple[TextTable, TextTable | None]:
    """(train, test|None) tables from the named source."""
    embedded = source == "builtin" and dataset in BUILTIN and task_copy is None
    if source in ("builtin", "hub") and dataset in PAPER_TASKS and not embedded:
        # A paper task by name: its hub id, columns and splits from the registry (or its saved copy).
        return load_task(dataset, task_copy=task_copy, cache_dir=cache_dir)
    if source == "builtin":
        return load_builtin(dataset, cache_dir)
    if source == "files":
        if train_file is None:
            raise ConfigError("source 'files' needs key 'train_file' (and optionally 'test_file')")
        return load_files(train_file, test_file, text_column=text_column, label_column=label_column,
                          text_pair_column=text_pair_column)
    if source == "hub":
        return load_hub(dataset, config_name=hub_config, text_column=text_column, label_column=label_column,
                        text_pair_column=text_pair_column, cache_dir=cache_dir)
    raise ConfigError(f"key 'source' must be one of {list(SOURCES)}, got {source!r}")


def build_federated_data(
    *,
    source: str,
    dataset: str,
    tokenizer: Any,
    max_length: int,
    num_devices: int,
    partition_method: str,
    partition_alpha: float,
    min_samples_per_device: int,
    test_fraction: float,
    seed: int,
    validation_fraction: float = 0.0,
    personal_eval_fraction: float = 0.0,
    cache_dir: str | os.PathLike | None = None,
    train_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    hub_config: str | None = None,
    max_train_samples: int | None = None,
    tables: tuple[TextTable, TextTable | None] | None = None,
    encode_cache_dir: str | os.PathLike | None = None,
) -> FederatedData:
    """Load (or take `tables` already loaded), split if no test set, subsample, partition and encode
    (once per data, tokenizer and length when `encode_cache_dir` is given)."""
    t0 = time.perf_counter()
    if tables is None:
        tables = load_source(source=source, dataset=dataset, cache_dir=cache_dir, train_file=train_file,
                             test_file=test_file, text_column=text_column, label_column=label_column,
                             text_pair_column=text_pair_column, hub_config=hub_config)
    train, test = tables
    if test is None:
        # Depends only on (seed, test_fraction): every method compared under one seed sees the same test set.
        train, test = stratified_split(train, test_fraction=test_fraction, seed=seed)
    validation = None
    if validation_fraction > 0:
        # From the training pool, before subsampling and partitioning: the devices never see it, and it
        # depends only on (seed, fractions), so every method compared under one seed is tuned on the same set.
        train, validation = stratified_split(train, test_fraction=validation_fraction, seed=seed + 3)
    if max_train_samples is not None:
        if int(max_train_samples) <= 0:
            raise ConfigError(f"max_train_samples must be positive or null, got {max_train_samples!r}")
        train = stratified_subsample(train, int(max_train_samples), seed=seed + 1)
    parts = partition_indices(np.asarray(train.labels), num_devices, method=partition_method,
                              alpha=partition_alpha, min_samples=min_samples_per_device, seed=seed + 2)
    # Encode once and slice: one tokenizer pass instead of one per device.
    enc_train = encode_cached(train, tokenizer, max_length=max_length, cache_dir=encode_cache_dir)
    enc_test = encode_cached(test, tokenizer, max_length=max_length, cache_dir=encode_cache_dir)
    enc_val = None if validation is None else encode_cached(validation, tokenizer, max_length=max_length,
                                                              cache_dir=encode_cache_dir)
    fd = FederatedData(
        train=[_device_data(d, p, enc_train, personal_eval_fraction, seed) for d, p in enumerate(parts)],
        test=enc_test,
        num_classes=train.num_classes,
        label_names=list(train.label_names),
        validation=enc_val,
    )
    st = fd.stats()
    log.info("data %s/%s: %d train over %d devices (min %d, median %.0f, max %d), %d validation, %d test, "
             "%d classes %s, %.1f s", source, dataset, st["train_num"], st["num_devices"], st["size_min"],
             st["size_median"], st["size_max"], st["validation_num"], st["test_num"], fd.num_classes,
             fd.label_names, time.perf_counter() - t0)
    return fd


def _device_data(device_id: int, part, enc_train: EncodedSet, heldout_fraction: float, seed: int) -> DeviceData:
    """A device's samples; with heldout_fraction a seeded share of them is kept apart (at least one
    sample each side), the same on every rank and for every method compared under one seed."""
    part = np.asarray(part)
    if heldout_fraction <= 0 or len(part) < 2:
        return DeviceData(device_id, enc_train.subset(part))
    rng = np.random.default_rng([seed, 4, device_id])
    k = min(len(part) - 1, max(1, int(round(heldout_fraction * len(part)))))
    perm = rng.permutation(len(part))
    keep, held = np.sort(part[perm[k:]]), np.sort(part[perm[:k]])
    return DeviceData(device_id, enc_train.subset(keep), enc_train.subset(held))


def to_fedml_dataset(fd: FederatedData) -> list:
    """FedML's 8-element dataset list; every loader slot holds a DeviceData (id -1 for the global sets)."""
    train_global = DeviceData(-1, EncodedSet.concat([d.data for d in fd.train]))
    test_global = DeviceData(-1, fd.test)
    train_local_num_dict = {i: len(d) for i, d in enumerate(fd.train)}
    train_local_dict = {i: d for i, d in enumerate(fd.train)}
    # Every device is evaluated on the shared global test set (same tensors, no copies).
    test_local_dict = {i: DeviceData(i, fd.test) for i in range(len(fd.train))}
    return [fd.train_num, len(fd.test), train_global, test_global, train_local_num_dict,
            train_local_dict, test_local_dict, fd.num_classes]
