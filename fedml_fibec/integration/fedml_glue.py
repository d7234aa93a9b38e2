"""FedML's arguments object built from our config, and the server-side round sampling we need."""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from fedml.arguments import Arguments
from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator

from ..config import RunConfig
from .trainer import derived_seed


def fedml_arguments(cfg: RunConfig, rank: int, comm: Any, *, fedml_rounds: int) -> Arguments:
    """FedML's `args`: our sections flattened (as FedML does with YAML) plus what FedML needs."""
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
    for key, value in {
        "rank": rank,
        "comm": comm,
        "client_id_list": None,
        "test_on_clients": "no",
        "sys_perf_profiling": False,
        "skip_log_model_net": True,
        "enable_contribution": False,
        "enable_cuda_rpc": False,
        "is_mobile": 0,
    }.items():
        setattr(args, key, value)
    return args


def sample_devices(seed: int, round_idx: int, total: int, per_round: int) -> list[int]:
    """The devices of a training round: a seeded draw without replacement, the same for every method."""
    if total == per_round:
        return list(range(total))
    rng = np.random.RandomState(derived_seed(seed, "sample", round_idx) % (2**32))
    return sorted(int(i) for i in rng.choice(total, per_round, replace=False))


class RoundSampledAggregator(FedMLAggregator):
    """FedML's server-side aggregator with one change: which devices take part in each round.

    FedML 0.9.6 draws the devices of round r+1 with the seed of round r, so rounds 0 and 1 train
    the same devices. Here the k-th draw is for the k-th exchange; the scoring exchange of FibecFed
    uses the devices of training round 0, so every method trains the same devices in each round.
    """

    def __init__(self, *fedml_args, seed: int, scoring_exchange: bool, first_round: int = 0):
        super().__init__(*fedml_args)
        self._seed = seed
        self._next_exchange = first_round
        self._offset = 1 if scoring_exchange else 0

    def data_silo_selection(self, round_idx, client_num_in_total, client_num_per_round):
        train_round = max(0, self._next_exchange - self._offset)
        self._next_exchange += 1
        return sample_devices(self._seed, train_round, client_num_in_total, client_num_per_round)
