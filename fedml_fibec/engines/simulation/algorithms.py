"""FedML's simulation-MPI entry points, with our round sampling and upload bookkeeping added.

FedML's server-side aggregators sample with np.random.seed(round_idx), ignoring the run seed and
differing from our path; subclasses here draw with fedml_glue.sample_devices so every method
trains the same devices in each round, and pass each upload to our ServerAggregator for the
metrics. The subclass replaces the aggregator name inside FedML's API module for this process
(FedML's own files stay untouched), then FedML's `FedML_<X>_distributed` runs as usual.

We call those functions directly rather than through fedml.SimulatorMPI, which only dispatches to
them and drops the server aggregator for FedNova.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from ...config import RunConfig
from ...core.seeds import sample_devices

# FedML name -> (API module, entry function, server-side aggregator class in that module)
ALGORITHMS = {
    "FedAvg": ("fedml.simulation.mpi.fedavg.FedAvgAPI", "FedML_FedAvg_distributed", "FedAVGAggregator"),
    "FedProx": ("fedml.simulation.mpi.fedprox.FedProxAPI", "FedML_FedProx_distributed", "FedProxAggregator"),
    "FedOpt": ("fedml.simulation.mpi.fedopt.FedOptAPI", "FedML_FedOpt_distributed", "FedOptAggregator"),
    "FedNova": ("fedml.simulation.mpi.fednova.FedNovaAPI", "FedML_FedNova_distributed", "FedNovaAggregator"),
}

# FedAdam's adaptivity tau (Reddi et al. 2021 use 1e-3): without it Adam's server step is sign-like.
SERVER_ADAM_EPS = 1e-3


class _RoundHooks:
    """Mixed into a FedML aggregator: our client sampling, and uploads shown to our ServerAggregator."""

    cfg: RunConfig  # set on the subclass by install()

    def client_sampling(self, round_idx, client_num_in_total, client_num_per_round):
        return sample_devices(self.cfg.common_args.random_seed, int(round_idx), client_num_in_total,
                              client_num_per_round)

    def add_local_trained_result(self, index, *result):
        self.aggregator.observe_upload(result[0])
        super().add_local_trained_result(index, *result)


class _ServerAdam:
    """Mixed into FedML's FedOptAggregator: FedML passes `momentum` to every server optimizer class,
    which torch's Adam does not take; Adam gets betas=(server_momentum, 0.99) instead."""

    def _instantiate_opt(self):
        tr = self.cfg.train_args
        if tr.server_optimizer != "adam":
            return super()._instantiate_opt()
        params = [p for p in self.get_model_params() if p.requires_grad]
        return torch.optim.Adam(params, lr=tr.server_lr, betas=(tr.server_momentum, 0.99), eps=SERVER_ADAM_EPS)


def install(method: str, cfg: RunConfig) -> Callable:
    """Put our aggregator subclass into FedML's API module for `method`; return FedML's entry function."""
    module_name, entry, cls_name = ALGORITHMS[method]
    api = importlib.import_module(module_name)
    base = getattr(api, cls_name)
    if issubclass(base, _RoundHooks):  # installed before in this process: FedML's own class is its base
        base = next(b for b in base.__mro__[1:] if not issubclass(b, _RoundHooks) and b.__name__ == cls_name)
    mixins = (_RoundHooks, _ServerAdam) if method == "FedOpt" else (_RoundHooks,)
    setattr(api, cls_name, type(f"Sampled{cls_name}", (*mixins, base),
                                {"cfg": cfg, "__doc__": f"FedML's {cls_name} with our round sampling and upload "
                                 "bookkeeping."}))
    return getattr(api, entry)
