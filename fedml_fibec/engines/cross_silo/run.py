"""One run of our engine (FibecFed and the LoRA-FL methods) over FedML's cross-silo managers.

Under MPI, rank 0 is the server and ranks 1..worker_num are client processes, each serving its
share of the round's devices. Under GRPC every process is started on its own: rank 0 is the
server, silo r (1..N) holds device r-1 only.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from fedml.cross_silo.client.fedml_trainer_dist_adapter import TrainerDistAdapter

from ...config import RunConfig
from ...core.server_round import exchanges_of
from ...core.state_store import DeviceStateStore
from ...data import FederatedData, to_fedml_dataset
from ...errors import ConfigError
from ...fedml_glue import mpi_transport
from ...fedml_glue.args import fedml_arguments
from ...metrics import MetricsLog
from ...core.messages import WIRE_DTYPES
from ...models.blocks import num_blocks
from ...models.lora import trainable_state_dict
from . import checkpoint, codec, grpc_transport
from .certs import load_identity
from .aggregator import FibecServerAggregator
from .client_manager import FibecClientManager
from .faults import FaultPlan
from .sampling import RoundSampledAggregator
from .server_manager import FibecServerManager
from .trainer import FibecClientTrainer

log = logging.getLogger("fedml_fibec")


def silo_dataset(dataset: list, silo_index: Optional[int]) -> list:
    """FedML's dataset list keeping only one silo's partition (None: the server keeps none)."""
    keep = [] if silo_index is None else [silo_index]
    num, local, test_local = dataset[4], dataset[5], dataset[6]
    return [sum(num[i] for i in keep), dataset[1], None, dataset[3], {i: num[i] for i in keep},
            {i: local[i] for i in keep}, {i: test_local[i] for i in keep}, dataset[7]]


def wire_settings(cfg: RunConfig, rank: int, model) -> grpc_transport.WireSettings:
    """What this process's GRPC transport accepts: the model's shareable tensors, their size, its TLS identity."""
    shapes = {k: tuple(v.shape) for k, v in trainable_state_dict(model).items()}
    spec = codec.TensorSpec(shapes, WIRE_DTYPES[cfg.comm_args.payload_dtype], num_blocks(model))
    c = cfg.comm_args
    identity = None if c.insecure else load_identity(c.tls_ca_cert, c.tls_cert, c.tls_key, rank)
    return grpc_transport.WireSettings(spec, grpc_transport.WireSettings.limit_for(spec), identity)


def run_cross_silo(cfg: RunConfig, out_dir: Path, world, model, fed_data: FederatedData, store: DeviceStateStore,
                   resume: bool = False) -> Optional[dict]:
    """Run this rank of our engine; the server returns the run summary."""
    import fedml

    rank, grpc = world.rank, cfg.comm_args.backend == "GRPC"
    if grpc:
        grpc_transport.install(wire_settings(cfg, rank, model))
    else:
        mpi_transport.install()
    dataset = to_fedml_dataset(fed_data)
    if grpc:  # a silo keeps only its own partition; the server keeps none (it needs the test set)
        dataset = silo_dataset(dataset, rank - 1 if rank else None)
    faults = FaultPlan.from_environment()

    resumed = checkpoint.load(out_dir) if rank == 0 and resume else None
    done = resumed["exchanges_done"] if resumed else 0
    exchanges = exchanges_of(cfg)
    if resumed and done >= exchanges:
        raise ConfigError(f"--resume {out_dir}: the run is already complete ({done} of {exchanges} "
                          "exchanges); see its summary.json")
    if rank == 0 and resume and resumed is None:
        log.warning("--resume %s: no checkpoint yet (no exchange completed); starting from round 0", out_dir)
    # FedML runs the exchanges that remain (all of them on the clients: they stop on the server's word).
    args = fedml_arguments(cfg, rank, world.comm, fedml_rounds=exchanges - done)
    fedml.init(args, check_env=False, should_init_logs=False)
    device = fedml.device.get_device(args)
    model.to(device)
    if rank != 0:
        trainer = FibecClientTrainer(model, args, cfg, store)
        adapter = TrainerDistAdapter(args, device, rank, model, dataset[0], dataset[4], dataset[5], dataset[6],
                                     trainer)
        FibecClientManager(args, adapter, world.comm, rank, cfg.worker_num, cfg.comm_args.backend, cfg=cfg,
                           store=store, faults=faults).run()
        return None

    metrics = MetricsLog(out_dir, cfg.train_args.federated_optimizer, cfg.train_args.comm_round)
    aggregator = FibecServerAggregator(model, args, cfg, fed_data.test, metrics, device, fed_data.validation)
    aggregator.set_id(0)
    if resumed:
        checkpoint.restore(resumed, aggregator=aggregator, metrics=metrics)
        log.info("resumed from %s: %d of %d exchanges done (round %d)", checkpoint.checkpoint_path(out_dir), done,
                 exchanges, aggregator.server_round.round)
    server_side = RoundSampledAggregator(
        dataset[2], dataset[3], dataset[0], dataset[5], dataset[6], dataset[4], cfg.worker_num, device, args,
        aggregator, seed=cfg.common_args.random_seed, scoring_exchange=exchanges > cfg.train_args.comm_round,
        first_exchange=resumed["sampler_next"] if resumed else 0)
    log.info("server on %s: %d rounds (%d FedML exchanges), %d devices, %d per round over %d client process(es); "
             "results in %s", device, cfg.train_args.comm_round, exchanges, cfg.train_args.client_num_in_total,
             cfg.train_args.client_num_per_round, cfg.worker_num, out_dir)
    manager = FibecServerManager(args, server_side, world.comm, rank, cfg.worker_num, cfg.comm_args.backend,
                                 cfg=cfg, out_dir=out_dir, metrics=metrics, first_exchange=done, faults=faults)
    manager.run()
    if manager.failure is not None:
        raise manager.failure
    extra = {"gal": aggregator.server_round.gal, "out_dir": str(out_dir), "world_size": world.size,
             "worker_num": cfg.worker_num, "first_exchange_at": manager.first_exchange_at,
             "test_majority_share": fed_data.test_majority_share}
    if grpc:
        cm = manager.com_manager
        extra.update(backend="GRPC", tls=cm.settings.identity is not None, wire_bytes_sent=cm.bytes_sent,
                     wire_bytes_received=cm.bytes_received, wire_messages_rejected=cm.rejected_messages,
                     silos_active_at_end=manager.active)
    return metrics.write_summary(cfg.to_sections(), extra)
