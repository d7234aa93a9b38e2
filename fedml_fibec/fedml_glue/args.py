"""FedML's arguments object built from our config (the config is read as RunConfig everywhere else)."""
from __future__ import annotations

import argparse
from typing import Any

from fedml.arguments import Arguments

from ..config import RunConfig


def fedml_arguments(cfg: RunConfig, rank: int, comm: Any, *, fedml_rounds: int) -> Arguments:
    """FedML's `args`: our sections flattened (as FedML does with YAML) plus what FedML needs.

    Only FedML's own code reads this object; ours reads the RunConfig.
    """
    cmd = argparse.Namespace(yaml_config_file="", run_id="0", rank=rank, local_rank=0, node_rank=0,
                             role="server" if rank == 0 else "client", run_device_id="0", using_mlops=False)
    args = Arguments(cmd, training_type=cfg.common_args.training_type, comm_backend=cfg.comm_args.backend)
    sections = cfg.to_sections()
    # FedML counts the scoring exchange as a round, and tests every round; our aggregator decides
    # when to evaluate (validation_args.frequency_of_the_test).
    sections["train_args"]["comm_round"] = fedml_rounds
    sections["validation_args"]["frequency_of_the_test"] = 1
    sections["device_args"]["worker_num"] = cfg.worker_num
    args.set_attr_from_config(sections)
    # FedML numbers the client processes 1..client_num_per_round; ours are 1..worker_num, which is
    # fewer when each client process serves several devices per round.
    client_ids = None
    if cfg.common_args.training_type == "cross_silo":
        client_ids = str(list(range(1, cfg.worker_num + 1)) if rank == 0 else [rank])
    for key, value in {
        # FedML branches on its own dataset names (`stackoverflow*` makes its aggregators sample a
        # validation set from `test_global.dataset`); ours are not FedML's data, so FedML sees them prefixed.
        "dataset": f"fibec-{cfg.data_args.dataset}",
        "rank": rank,
        "comm": comm,
        "client_id_list": client_ids,
        "test_on_clients": "no",
        "sys_perf_profiling": False,
        "skip_log_model_net": True,
        "enable_contribution": False,
        "enable_cuda_rpc": False,
        "is_mobile": 0,
    }.items():
        setattr(args, key, value)
    return args
