"""Drive our FedML trainer and aggregator in one process, in the order FedML's cross-silo engine calls them.

Tests use it to check algorithm-level properties (reduction to FedAvg, device state across
processes, bytes) without MPI; the MPI tests prove the same classes run under FedML itself.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fedml_fibec.config import RunConfig, load_config
from fedml_fibec.data import to_fedml_dataset
from fedml_fibec.integration import runner
from fedml_fibec.integration.aggregator import FibecServerAggregator
from fedml_fibec.integration.fedml_glue import fedml_arguments, sample_devices
from fedml_fibec.integration.state_store import DeviceStateStore
from fedml_fibec.integration.trainer import FibecClientTrainer
from fedml_fibec.metrics import MetricsLog


def tiny_config(model_dir: Path, csv: Path, *overrides: str) -> RunConfig:
    """A small valid config over a tiny local model and CSV."""
    base = [f"model={model_dir}", "data_source=files", f"train_file={csv}", "client_num_in_total=6",
            "client_num_per_round=2", "comm_round=3", "min_samples_per_device=8", "min_samples=8",
            "local_steps=3", "batch_size=8", "device_eval_samples=16", "eval_batch_size=32",
            "max_seq_length=16"]
    return load_config(None, base + list(overrides))


def build_model(cfg: RunConfig):
    """The model every rank builds from the run seed (binary tiny task)."""
    return runner.build_model(cfg, 2)


def build_data(cfg: RunConfig, tokenizer):
    """The config's federated data, as the runner builds it."""
    return runner.build_data(cfg, runner.load_tables(cfg, None), tokenizer)


def run_federation(cfg: RunConfig, out_dir: Path, num_processes: int | None = None, assign=None):
    """Run cfg's rounds with `num_processes` client trainers; returns (aggregator, metrics, trainers).

    assign(round, slot) -> which trainer serves the slot-th sampled device (default: slot).
    """
    num_processes = num_processes or cfg.train_args.client_num_per_round
    server_model, tok = build_model(cfg)
    t = cfg.train_args
    fd = build_data(cfg, tok)
    dataset = to_fedml_dataset(fd)
    args = fedml_arguments(cfg, 0, None, fedml_rounds=t.comm_round)
    metrics = MetricsLog(out_dir, t.federated_optimizer, t.comm_round)
    device = torch.device("cpu")
    aggregator = FibecServerAggregator(server_model, args, cfg, fd.test, metrics, device)
    store = DeviceStateStore(out_dir / "device_state")
    trainers = [FibecClientTrainer(build_model(cfg)[0], args, cfg, store) for _ in range(num_processes)]
    message = aggregator.get_model_params()
    exchanges = aggregator.fedml_rounds
    for exchange in range(exchanges):
        train_round = max(0, exchange - (exchanges - t.comm_round))
        devices = sample_devices(cfg.common_args.random_seed, train_round, t.client_num_in_total,
                                 t.client_num_per_round)
        uploads = []
        for slot, dev in enumerate(devices):
            trainer = trainers[assign(exchange, slot) if assign else slot]
            trainer.update_dataset(dataset[5][dev], dataset[6][dev], dataset[4][dev])
            trainer.set_model_params(message)
            trainer.on_before_local_training(dataset[5][dev], device, args)
            trainer.train(dataset[5][dev], device, args)
            trainer.on_after_local_training(dataset[5][dev], device, args)
            uploads.append((dataset[4][dev], trainer.get_model_params()))
        message = aggregator.aggregate(uploads)
        aggregator.set_model_params(message)
        aggregator.test(dataset[3], device, args)
    return aggregator, metrics, trainers
