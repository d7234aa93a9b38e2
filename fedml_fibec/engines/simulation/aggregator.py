"""ServerAggregator for FedML's simulation-MPI algorithms: global LoRA state, evaluation, our metrics.

FedML's server-side aggregators (FedAVGAggregator, FedProxAggregator, FedOptAggregator,
FedNovaAggregator) do the arithmetic; they reach the model through this object: get/set_model_params,
`model` (FedOpt builds its server optimizer over model.parameters() and strictly loads averaged
state dicts into a deep copy of it), and, once per round, test_all (FedAvg, FedProx, FedOpt) or
test (FedNova). Each round ends in one metrics.jsonl record, the same fields our path writes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from fedml.core import ServerAggregator
from torch import nn

from ... import algorithm as alg
from ...config import RunConfig
from ...core.server_round import evaluate_global, is_evaluation_round
from ...core.records import RoundClock, round_record
from ...data import EncodedSet
from ...metrics import MetricsLog
from ...models import load_trainable_state, num_blocks, trainable_state_dict


class TrainableView(nn.Module):
    """The model's LoRA + head Parameters (the same objects) under their own names, and nothing else.

    FedML's FedOpt loads the averaged upload with a strict load_state_dict into a copy of the
    server model and steps an optimizer over its parameters; on this view both see exactly the
    trainable tensors, and a step moves the real model's tensors.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        params = dict(model.named_parameters())
        for name in trainable_state_dict(model):
            owner: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            owner.register_parameter(leaf, params[name])


class BaselineServerAggregator(ServerAggregator):
    """Global trainable tensors for FedML's aggregators; one metrics record per round."""

    def __init__(self, model, args, cfg: RunConfig, test_set: EncodedSet, metrics: MetricsLog, device,
                 validation_set: Optional[EncodedSet] = None):
        super().__init__(TrainableView(model), args)
        self.full_model = model
        self.cfg = cfg
        self.test_set = test_set
        self.validation_set = validation_set
        self.device = device
        self.num_blocks = num_blocks(model)
        self.clock = RoundClock(metrics)
        self.round = 0
        self._uploads: list[dict] = []
        self._bytes_up = 0

    # FedML hooks -------------------------------------------------------------------------------
    def get_model_params(self):
        # A fresh CPU copy: FedML's FedProx converts what it gets to lists in place.
        return OrderedDict((k, p.detach().float().cpu().clone()) for k, p in self.model.named_parameters())

    def set_model_params(self, model_parameters):
        load_trainable_state(self.full_model, {k: torch.as_tensor(v).to(self.device, torch.float32)
                                               for k, v in model_parameters.items()})

    def test_all(self, train_data_local_dict, test_data_local_dict, device, args) -> bool:
        # True: FedML's aggregators then skip their own per-client evaluation loop.
        self._end_round()
        return True

    def test(self, test_data, device, args):
        # FedNova's aggregator calls only this, once per round.
        self._end_round()
        return None

    # called by our subclasses of FedML's aggregators (algorithms.py) --------------------------
    def observe_upload(self, result) -> None:
        """Note one client process's upload: its statistics and tensor bytes."""
        uploads = [r["grad"] for r in result] if isinstance(result, list) else [result]  # FedNova sends a list
        for u in uploads:
            self._bytes_up += alg.payload_bytes(u)
            self._uploads.append(getattr(u, "stats", {}))

    # internals ------------------------------------------------------------------------------------
    def _end_round(self) -> None:
        """Evaluate the new global model (when due) and write the round's record."""
        tr = self.cfg.train_args
        r = self.round
        evaluation = evaluate_global(self.full_model, self.cfg, self.test_set, self.validation_set, self.device,
                                     is_evaluation_round(self.cfg, r))
        # Uploads arrive in whatever order FedML's processes finish; the record's means are float sums, so
        # they are taken in device order to make a run's log the same every time (as the cross-silo server
        # does by rank).
        stats = sorted(self._uploads, key=lambda s: s.get("device_id", -1))
        self._uploads = []
        # Every participant receives the whole trainable set once per round.
        bytes_down = alg.payload_bytes(self.get_model_params()) * tr.client_num_per_round
        record = round_record(r, stats, devices=[s["device_id"] for s in stats if "device_id" in s],
                              bytes_up=self._bytes_up, bytes_down=bytes_down, gal=list(range(self.num_blocks)))
        record.update(evaluation)
        if any("tau_eff" in s for s in stats):
            record["tau_eff"] = sum(s.get("tau_eff", 0.0) for s in stats)
        self._bytes_up = 0
        self.round += 1
        self.clock.close(record)
