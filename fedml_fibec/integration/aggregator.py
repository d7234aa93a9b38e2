"""FedML ServerAggregator for FibecFed and FedAvg-LoRA: GAL selection, layer-selective averaging, metrics.

FedML's cross-silo server calls, per round: aggregate(list of (n, upload)) -> set_model_params ->
test_all -> test; what `aggregate` returns is sent to the next round's devices. Before the first
aggregation of FibecFed, one exchange collects layer scores instead of training (phase "score").
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Optional

import torch
from fedml.core import ServerAggregator

from .. import algorithm as alg
from ..config import RunConfig
from ..data import EncodedSet
from ..errors import FibecError
from ..metrics import MetricsLog
from ..models import block_index, load_trainable_state, num_blocks, trainable_state_dict
from .local import evaluate
from .payload import PHASE_SCORE, PHASE_TRAIN, WIRE_DTYPES, download_message, shared_keys, to_wire, upload_bytes

log = logging.getLogger(__name__)


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class FibecServerAggregator(ServerAggregator):
    """Holds the global tensors and the GAL; averages only what the devices share."""

    def __init__(self, model, args, cfg: RunConfig, test_set: EncodedSet, metrics: MetricsLog, device):
        super().__init__(model, args)
        self.cfg = cfg
        self.test_set = test_set
        self.metrics = metrics
        self.device = device
        self.global_tensors = OrderedDict((k, v.detach().float().cpu().clone())
                                          for k, v in trainable_state_dict(model).items())
        self.num_blocks = num_blocks(model)
        fb = cfg.fibec_args
        fibec = cfg.train_args.federated_optimizer == "FibecFed"
        needs_selection = fibec and not (fb.gal_ratio is not None and fb.gal_ratio >= 1)
        self.phase = PHASE_SCORE if needs_selection else PHASE_TRAIN
        self.gal: Optional[list[int]] = None if needs_selection else list(range(self.num_blocks))
        self.layer_scores: Optional[torch.Tensor] = None
        self.round = 0
        self._carry = {"bytes_up": 0, "bytes_down": 0}  # the scoring exchange counts into round 0
        self._pending: Optional[dict] = None
        self._round_started = time.time()
        self.last_message: Optional[OrderedDict] = None

    @property
    def fedml_rounds(self) -> int:
        """Rounds FedML must run: the training rounds plus the scoring exchange if any."""
        return self.cfg.train_args.comm_round + (1 if self.phase == PHASE_SCORE else 0)

    def state_dict(self) -> dict:
        """Everything the server needs to continue after this point (checkpoint.py writes it)."""
        return {"global_tensors": OrderedDict((k, v.clone()) for k, v in self.global_tensors.items()),
                "gal": None if self.gal is None else list(self.gal), "phase": self.phase, "round": self.round,
                "layer_scores": self.layer_scores, "carry": dict(self._carry),
                "round_bytes_down": getattr(self, "_round_bytes_down", 0)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() taken after a completed exchange."""
        for k, v in state["global_tensors"].items():
            self.global_tensors[k] = v.float().clone()
        self.gal = None if state["gal"] is None else list(state["gal"])
        self.phase, self.round, self.layer_scores = state["phase"], state["round"], state["layer_scores"]
        self._carry = dict(state["carry"])
        self._round_bytes_down = state["round_bytes_down"]
        self._pending = None
        self._round_started = time.time()

    # FedML hooks -------------------------------------------------------------------------------
    def get_model_params(self):
        return self._outgoing()

    def set_model_params(self, model_parameters):
        # The global state lives in self.global_tensors; FedML hands back what aggregate returned.
        self.last_message = model_parameters

    def aggregate(self, raw_client_model_or_grad_list):
        uploads = [payload for _, payload in raw_client_model_or_grad_list]
        bytes_up = sum(upload_bytes(u) for u in uploads)
        if self.phase == PHASE_SCORE:
            self._select_gal(uploads)
            self.phase = PHASE_TRAIN
            self._carry["bytes_up"] += bytes_up
            return self._outgoing()
        accepted, rejected = self._check(uploads)
        averaged = alg.weighted_average([(u["tensors"], u["num_samples"]) for u in accepted])
        for k, v in averaged.items():
            self.global_tensors[k] = v.float()
        stats = [u["stats"] for u in accepted]
        record = {
            "round": self.round,
            "train_loss": _mean(s.get("train_loss") for s in stats),
            "device_accuracy": _mean(s.get("device_accuracy") for s in stats),
            "bytes_up": bytes_up + self._carry["bytes_up"],
            "bytes_down": self._round_bytes_down + self._carry["bytes_down"],
            "curriculum_share": _mean(s.get("curriculum_share") for s in stats),
            "gal": list(self.gal),
            "updated_neuron_share": _mean(s.get("updated_neuron_share") for s in stats),
            "num_devices": len(accepted),
            "devices": [u["device_id"] for u in accepted],
            "rejected_payloads": len(rejected),
            # Mean seconds per device spent on each part of local work (where the time goes).
            **{k: _mean(s.get(k) for s in stats) for k in ("scoring_seconds", "train_seconds", "eval_seconds")},
        }
        self._carry = {"bytes_up": 0, "bytes_down": 0}
        if any(u.get("layer_scores") is not None for u in accepted):
            self._select_gal(accepted)
            record["gal_next"] = list(self.gal)
        self._pending = record
        self.round += 1
        return self._outgoing()

    def test_all(self, train_data_local_dict, test_data_local_dict, device, args) -> bool:
        return True

    def test(self, test_data, device, args):
        """Evaluate the new global model (when due) and write this round's record."""
        if self._pending is None:  # after the scoring exchange: nothing trained yet
            return None
        record, self._pending = self._pending, None
        r, total = record["round"], self.cfg.train_args.comm_round
        acc = loss = None
        if r % self.cfg.validation_args.frequency_of_the_test == 0 or r == total - 1:
            load_trainable_state(self.model, {k: v.to(self.device) for k, v in self.global_tensors.items()})
            acc, loss = evaluate(self.model, self.test_set, batch_size=self.cfg.validation_args.eval_batch_size,
                                 device=self.device, bf16=self.cfg.device_args.bf16)
        now = time.time()
        record.update(global_accuracy=acc, global_loss=loss, wall_seconds=now - self.metrics.started,
                      round_seconds=now - self._round_started)
        self._round_started = now
        self.metrics.add(record)
        eta = self.metrics.eta_seconds()
        log.info("round %d/%d  acc %s  device acc %s  loss %.4f  up %.2f MB  %.1fs/round  ETA %s",
                 r + 1, total, "-" if acc is None else f"{acc:.4f}",
                 "-" if record["device_accuracy"] is None else f"{record['device_accuracy']:.4f}",
                 record["train_loss"] or float("nan"), record["bytes_up"] / 1e6, record["round_seconds"],
                 "-" if eta is None else time.strftime("%M:%S", time.gmtime(eta)))
        return acc, loss, None, None

    # internals ------------------------------------------------------------------------------------
    def _outgoing(self) -> OrderedDict:
        """The message for the coming round; its bytes count once per receiving device."""
        keys = list(self.global_tensors) if self.phase == PHASE_SCORE else \
            shared_keys(self.global_tensors, self.gal, block_index, self.cfg.train_args.federated_optimizer)
        k = self.cfg.fibec_args.reselect_every
        rescore = self.phase == PHASE_TRAIN and k > 0 and (self.round + 1) % k == 0 \
            and self.round + 1 < self.cfg.train_args.comm_round
        tensors = to_wire({key: self.global_tensors[key] for key in keys}, self.cfg.comm_args.payload_dtype)
        sent = alg.payload_bytes(tensors) * self.cfg.train_args.client_num_per_round
        if self.phase == PHASE_SCORE:
            self._carry["bytes_down"] += sent
        else:
            self._round_bytes_down = sent
        return download_message(self.round, self.phase, self.gal, tensors, rescore=rescore)

    def _select_gal(self, uploads: list[dict]) -> None:
        scored = [(u["layer_scores"], float(u["num_samples"])) for u in uploads if u.get("layer_scores") is not None]
        if not scored:
            raise FibecError("GAL selection: no device sent layer scores")
        self.layer_scores = alg.weighted_mean_scores(scored)
        fb = self.cfg.fibec_args
        self.gal = alg.select_gal(self.layer_scores, ratio=fb.gal_ratio, mass=fb.gal_mass)
        log.info("GAL selected: blocks %s of %d (layer scores %s)", self.gal, self.num_blocks,
                 [round(float(x), 4) for x in self.layer_scores])

    def _check(self, uploads: list[dict]) -> tuple[list[dict], list[dict]]:
        """Split uploads into those matching the current GAL and those rejected (logged)."""
        wire = WIRE_DTYPES[self.cfg.comm_args.payload_dtype]
        expected = {k: (tuple(self.global_tensors[k].shape), wire)
                    for k in shared_keys(self.global_tensors, self.gal, block_index, self.cfg.train_args.federated_optimizer)}
        accepted, rejected = [], []
        for u in uploads:
            try:
                alg.check_payload(u["tensors"], expected, device_id=u.get("device_id"))
                if not u.get("num_samples", 0) > 0:
                    raise alg.PayloadError(f"device {u.get('device_id')}: num_samples must be positive")
                accepted.append(u)
            except alg.PayloadError as exc:
                log.error("rejected upload: %s", exc)
                rejected.append(u)
        if not accepted:
            raise FibecError(f"round {self.round}: every upload was rejected; see the log for each device")
        return accepted, rejected
