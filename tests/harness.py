"""Drive the device round and the server round of our engine in one process, with no FedML object.

Tests use it to check algorithm-level properties (reduction to FedAvg, device state across
processes, bytes); the MPI and cross-silo tests prove the same rounds run under FedML itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedml_fibec import build
from fedml_fibec.config import RunConfig, load_config
from fedml_fibec.core.device_round import DeviceRound
from fedml_fibec.core.messages import Upload
from fedml_fibec.core.seeds import device_eval_subset, sample_devices
from fedml_fibec.core.server_round import ServerRound, exchanges_of
from fedml_fibec.core.state_store import DeviceStateStore

CPU = torch.device("cpu")


# The paper's scored GAL with our first reading of the sparse update (the defaults before issue 12's study):
# tests of that reading, and of the scoring exchange, name it instead of relying on the defaults.
FIRST_READING = ("gal_shape=scored", "sparse_target=local", "neuron_ranking=global", "rho=0.25")
# The paper's scored GAL (a scoring exchange before round 0) with today's sparse update.
SCORED_GAL = ("gal_shape=scored",)


def tiny_config(model_dir: Path, csv: Path, *overrides: str) -> RunConfig:
    """A small valid config over a tiny local model and CSV (a fixed 3 local steps unless epochs is set)."""
    base = [f"model={model_dir}", "data_source=files", f"train_file={csv}", "client_num_in_total=6",
            "client_num_per_round=2", "comm_round=3", "min_samples_per_device=8", "min_samples=8",
            "epochs=null", "local_steps=3", "batch_size=8", "device_eval_samples=16", "eval_batch_size=32",
            "max_seq_length=16"]
    return load_config(None, base + list(overrides))


def build_model(cfg: RunConfig):
    """The model every rank builds from the run seed (binary tiny task)."""
    return build.build_model(cfg, 2)


def build_data(cfg: RunConfig, tokenizer):
    """The config's federated data, as the runner builds it."""
    return build.build_data(cfg, build.load_tables(cfg, None), tokenizer)


@dataclass
class Federation:
    server: ServerRound
    records: list[dict]  # one per training round, evaluated
    last_uploads: list[Upload]  # the last exchange's uploads, in device order
    store: DeviceStateStore
    data: object  # the run's FederatedData


def run_federation(cfg: RunConfig, out_dir: Path, num_processes: int | None = None, assign=None) -> Federation:
    """Run cfg's rounds with `num_processes` device-round objects (one per simulated process).

    assign(exchange, slot) -> which process serves the slot-th sampled device (default: slot).
    """
    num_processes = num_processes or cfg.train_args.client_num_per_round
    server_model, tok = build_model(cfg)
    t = cfg.train_args
    fd = build_data(cfg, tok)
    server = ServerRound(server_model, cfg, fd.test, CPU, fd.validation)
    store = DeviceStateStore(out_dir / "device_state")
    processes = [DeviceRound(build_model(cfg)[0], cfg) for _ in range(num_processes)]
    n_eval = cfg.validation_args.device_eval_samples
    eval_set = device_eval_subset(fd.test, n_eval, cfg.common_args.random_seed) if n_eval > 0 else None
    records, uploads = [], []
    exchanges = exchanges_of(cfg)
    for exchange in range(exchanges):
        download = server.download()
        train_round = max(0, exchange - (exchanges - t.comm_round))
        devices = sample_devices(cfg.common_args.random_seed, train_round, t.client_num_in_total,
                                 t.client_num_per_round)
        uploads = []
        for slot, dev in enumerate(devices):
            process = processes[assign(exchange, slot) if assign else slot]
            state = store.load(dev)
            uploads.append(process.run(download, dev, fd.train[dev].data, state, CPU, eval_set=eval_set,
                                       personal_set=fd.train[dev].heldout))
            store.save(dev, state)
        record = server.aggregate(uploads)
        if record is not None:
            records.append(server.evaluate_if_due(record))
    return Federation(server, records, uploads, store, fd)
