"""The run's data and model, built the same way on every rank from the config and its seed."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import RunConfig


def load_tables(cfg: RunConfig, cache_dir: Optional[Path]):
    """The task's (train, test or None) tables: read before anything else so bad data fails first."""
    from .data import load_source

    d = cfg.data_args
    return load_source(source=d.data_source, dataset=d.dataset, cache_dir=cache_dir, train_file=d.train_file,
                       test_file=d.test_file, text_column=d.text_column, label_column=d.label_column,
                       text_pair_column=d.text_pair_column, hub_config=d.hub_config, task_copy=d.task_copy)


def build_model(cfg: RunConfig, num_labels: int, cache_dir: Optional[Path] = None):
    """The initial model with LoRA and its tokenizer, the same on every rank (seeded)."""
    import torch

    from .models import apply_lora, load_model_and_tokenizer

    m = cfg.model_args
    # Every rank builds the same initial model (head and LoRA init) from the run seed.
    torch.manual_seed(cfg.common_args.random_seed)
    model, tokenizer = load_model_and_tokenizer(m.model, num_labels, cache_dir=cache_dir)
    model = apply_lora(model, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                       target_modules=m.lora_target_modules)
    return model, tokenizer


def build_data(cfg: RunConfig, tables, tokenizer, cache_dir: Optional[Path] = None):
    """The config's federated data set from already loaded (train, test or None) tables.

    With `cache_dir`, the tokenised tensors are made once there and read by every later rank.
    """
    from .data import build_federated_data

    d, t = cfg.data_args, cfg.train_args
    return build_federated_data(
        source=d.data_source, dataset=d.dataset, tokenizer=tokenizer, max_length=d.max_seq_length,
        num_devices=t.client_num_in_total, partition_method=d.partition_method,
        partition_alpha=d.partition_alpha, min_samples_per_device=d.min_samples_per_device,
        test_fraction=d.test_fraction, validation_fraction=d.validation_fraction,
        personal_eval_fraction=cfg.validation_args.personal_eval_fraction, seed=cfg.common_args.random_seed, max_train_samples=d.max_train_samples,
        tables=tables, encode_cache_dir=cache_dir)
