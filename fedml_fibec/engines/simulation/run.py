"""One run of a FedML built-in algorithm on FedML's simulation-MPI path, after the shared set-up.

fedml_fibec/runner.run builds the model, the data and the device state store for every method,
then hands simulation runs here: rank 0 is FedML's server, ranks 1..K its client processes, each
serving the device FedML assigns it per round.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from ...config import RunConfig
from ...core.state_store import DeviceStateStore
from ...data import FederatedData, to_fedml_dataset

log = logging.getLogger("fedml_fibec")


def run_simulation(cfg: RunConfig, out_dir: Path, world, model, fed_data: FederatedData,
                   store: DeviceStateStore) -> Optional[dict]:
    """Run this rank of FedML's FedAvg / FedProx / FedOpt / FedNova; the server returns the summary."""
    import fedml

    from ...fedml_glue import mpi_transport
    from ...fedml_glue.args import fedml_arguments
    from ...metrics import MetricsLog
    from .aggregator import BaselineServerAggregator
    from .algorithms import install
    from .trainer import BaselineClientTrainer, FedNovaClientTrainer

    method, rank = cfg.train_args.federated_optimizer, world.rank
    mpi_transport.install()
    dataset = to_fedml_dataset(fed_data)
    args = fedml_arguments(cfg, rank, world.comm, fedml_rounds=cfg.train_args.comm_round)
    args.gmf = 0.0  # FedNova's server momentum: vanilla FedNova
    fedml.init(args, check_env=False, should_init_logs=False)
    device = fedml.device.get_device(args)
    model.to(device)
    entry = install(method, cfg)
    trainer = aggregator = metrics = None
    if rank == 0:
        metrics = MetricsLog(out_dir, f"FedML-{method}", cfg.train_args.comm_round)
        aggregator = BaselineServerAggregator(model, args, cfg, fed_data.test, metrics, device, fed_data.validation)
        log.info("FedML %s (simulation, MPI) on %s: %d rounds, %d devices, %d per round; results in %s", method,
                 device, cfg.train_args.comm_round, cfg.train_args.client_num_in_total,
                 cfg.train_args.client_num_per_round, out_dir)
    elif method == "FedNova":
        trainer = FedNovaClientTrainer(model, args, cfg, store, fed_data.test, dataset[4])
    else:
        trainer = BaselineClientTrainer(model, args, cfg, store, fed_data.test)
    # FedML's FedProx/FedOpt/FedNova managers write ./tmp/fedml when they finish: keep it in the run folder.
    os.chdir(os.environ["HOME"])
    entry(args, args.process_id, args.worker_num, args.comm, device, dataset, model,
          client_trainer=trainer, server_aggregator=aggregator)
    if rank != 0:
        return None
    return metrics.write_summary(cfg.to_sections(), {"gal": list(range(aggregator.num_blocks)), "out_dir": str(out_dir),
                                                     "world_size": world.size, "engine": "fedml-simulation-mpi",
                                                     "test_majority_share": fed_data.test_majority_share})
