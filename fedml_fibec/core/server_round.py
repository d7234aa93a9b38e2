"""The server's round of our engine, in pure torch: uploads in, a round record and the next Download out.

Read it as the paper's server steps (FIBECFED.md sections 2 and 4):
- FibecFed first runs a scoring exchange: every device sends layer sensitivities, the server
  averages them by data size and selects the global aggregation layers (GAL);
- each training exchange checks every upload against the current GAL (keys, shapes, wire dtype,
  finite values; a bad one is rejected and counted), averages each shared tensor over the devices,
  weighted by the samples they used, and returns the round's record;
- the next Download carries only the shared tensors (the head and the GAL blocks).
The global model is evaluated on the global test set (and the validation set, when the run holds
one out) when due. Nothing here knows FedML.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from .. import algorithm as alg
from ..config import RunConfig
from ..data import EncodedSet
from ..errors import FibecError
from ..models import block_index, load_trainable_state, num_blocks, trainable_state_dict
from .local import evaluate
from .messages import PHASE_SCORE, PHASE_TRAIN, WIRE_DTYPES, Download, Upload, to_wire
from ..methods import method_of
from .records import round_record

log = logging.getLogger("fedml_fibec")


def evaluate_global(model: nn.Module, cfg: RunConfig, test_set: EncodedSet, validation_set: Optional[EncodedSet],
                    device, due: bool) -> dict:
    """The global model's test accuracy and loss and, with a validation set, its validation ones (None if not due),
    and `server_eval_seconds`, what that evaluation took.

    Settings are chosen on `val_accuracy`; `global_accuracy` (the test set) is reported, never chosen on,
    and stays None in a run with eval_test_set false (a tuning run).
    The evaluation measures the run and is the same work for every method, so the report can also give
    the seconds to target without it (FedML runs it inside the round, between aggregation and the next
    download).
    """
    v = cfg.validation_args
    out: dict = {"global_accuracy": None, "global_loss": None}
    if validation_set is not None:
        out.update(val_accuracy=None, val_loss=None)
    started = time.perf_counter()
    if due:
        kw = dict(batch_size=v.eval_batch_size, device=device, bf16=cfg.device_args.bf16)
        if v.eval_test_set:
            out["global_accuracy"], out["global_loss"] = evaluate(model, test_set, **kw)
        if validation_set is not None:
            out["val_accuracy"], out["val_loss"] = evaluate(model, validation_set, **kw)
    out["server_eval_seconds"] = time.perf_counter() - started
    return out


def is_evaluation_round(cfg: RunConfig, round_idx: int) -> bool:
    """Every frequency_of_the_test rounds, and the last round; with eval_only_last = N, only the last N of these.

    Evaluation reads no random state and the server trains nothing, so the rounds it skips change no other
    number of the run: a tuning run's last three validation accuracies are those of the full run.
    """
    v, last = cfg.validation_args, cfg.train_args.comm_round - 1
    scheduled = round_idx % v.frequency_of_the_test == 0 or round_idx == last
    if not scheduled or v.eval_only_last is None:
        return scheduled
    later = sum(1 for r in range(round_idx + 1, last + 1) if r % v.frequency_of_the_test == 0 or r == last)
    return later < v.eval_only_last


def gal_is_fixed_suffix(cfg: RunConfig) -> bool:
    """A suffix GAL of gal_ratio of the blocks: known without any layer scores."""
    return cfg.fibec_args.gal_shape == "suffix" and cfg.fibec_args.gal_mass is None


def has_scoring_exchange(cfg: RunConfig) -> bool:
    """FibecFed selects its GAL in an exchange before round 0, unless it warms up with every block global
    or its GAL is a suffix of a fixed size (known without any scores: no device computes them)."""
    selects = method_of(cfg.train_args.federated_optimizer).selects_layers(cfg.fibec_args.gal_ratio)
    return selects and cfg.fibec_args.gal_warmup_rounds == 0 and not gal_is_fixed_suffix(cfg)


def exchanges_of(cfg: RunConfig) -> int:
    """Exchanges of a whole run: the training rounds plus FibecFed's layer-scoring exchange if any."""
    return cfg.train_args.comm_round + (1 if has_scoring_exchange(cfg) else 0)


class ServerRound:
    """Holds the global tensors and the GAL; averages only what the devices share."""

    def __init__(self, model: nn.Module, cfg: RunConfig, test_set: EncodedSet, device: torch.device,
                 validation_set: Optional[EncodedSet] = None):
        self.model = model
        self.cfg = cfg
        self.test_set = test_set
        self.validation_set = validation_set
        self.device = device
        self.method = method_of(cfg.train_args.federated_optimizer)
        self.global_tensors = OrderedDict((k, v.detach().float().cpu().clone())
                                          for k, v in trainable_state_dict(model).items())
        self.num_blocks = num_blocks(model)
        scoring = has_scoring_exchange(cfg)
        # Rounds with every block global before the GAL is chosen from the trained model (0: none).
        self.warmup = cfg.fibec_args.gal_warmup_rounds if self.method.selects_layers(cfg.fibec_args.gal_ratio) else 0
        self.phase = PHASE_SCORE if scoring else PHASE_TRAIN
        self.gal: Optional[list[int]]
        if scoring:
            self.gal = None  # chosen in the scoring exchange
        elif self.method.selects_layers(cfg.fibec_args.gal_ratio) and not self.warmup:
            # A fixed-size suffix (has_scoring_exchange is False only then), from round 0.
            self.gal = alg.select_gal(torch.zeros(self.num_blocks), ratio=cfg.fibec_args.gal_ratio, shape="suffix")
            log.info("GAL selected: blocks %s of %d (the last ones: gal_shape suffix, no layer scores needed)",
                     self.gal, self.num_blocks)
        else:
            self.gal = list(range(self.num_blocks))  # every block global (warm-up, or no selection)
        self.layer_scores: Optional[torch.Tensor] = None
        self.round = 0
        # The scoring exchange's bytes count into training round 0.
        self._carry = {"bytes_up": 0, "bytes_down": 0}

    # the two steps ------------------------------------------------------------------------------------
    def download(self) -> Download:
        """The message for the coming exchange (everything in the scoring exchange, then the shared part)."""
        keys = list(self.global_tensors) if self.phase == PHASE_SCORE else self.shared_keys()
        k, nxt = self.cfg.fibec_args.reselect_every, self.round + 1
        more = nxt < self.cfg.train_args.comm_round
        rescore = self.phase == PHASE_TRAIN and more and ((k > 0 and nxt % k == 0) or nxt == self.warmup)
        tensors = to_wire({key: self.global_tensors[key] for key in keys}, self.cfg.comm_args.payload_dtype)
        return Download(self.round, self.phase, None if self.gal is None else list(self.gal), tensors, rescore)

    def aggregate(self, uploads: list[Upload], receivers: Optional[int] = None) -> Optional[dict]:
        """Apply one exchange's uploads; the training round's record (None after the scoring exchange).

        `receivers`: devices the exchange's Download went to (default client_num_per_round); its
        tensor bytes count once per receiver.
        """
        receivers = self.cfg.train_args.client_num_per_round if receivers is None else receivers
        sent = self._download_bytes() * receivers
        bytes_up = sum(u.nbytes for u in uploads)
        if self.phase == PHASE_SCORE:
            self._select_gal(uploads)
            self.phase = PHASE_TRAIN
            self._carry = {"bytes_up": self._carry["bytes_up"] + bytes_up,
                           "bytes_down": self._carry["bytes_down"] + sent}
            return None
        accepted, rejected = self._check(uploads)
        # A row-sparse upload's other rows are the Download's: the global tensors in the wire dtype, unchanged
        # since the Download was made (rounds are synchronous).
        sent_tensors = to_wire({k: self.global_tensors[k] for k in self.shared_keys()}, self.cfg.comm_args.payload_dtype)
        averaged = alg.weighted_average([(u.dense_tensors(sent_tensors), u.num_samples) for u in accepted])
        for k, v in averaged.items():
            self.global_tensors[k] = v.float()
        record = round_record(self.round, [u.stats for u in accepted], devices=[u.device_id for u in accepted],
                              bytes_up=bytes_up + self._carry["bytes_up"],
                              bytes_down=sent + self._carry["bytes_down"], gal=self.gal, rejected=len(rejected))
        self._carry = {"bytes_up": 0, "bytes_down": 0}
        if any(u.layer_scores is not None for u in accepted):
            self._select_gal(accepted)
            record["gal_next"] = list(self.gal)
        self.round += 1
        return record

    def evaluate_if_due(self, record: dict) -> dict:
        """Add the global model's test accuracy and loss to a round's record (None when not due)."""
        due = is_evaluation_round(self.cfg, record["round"])
        if due:
            load_trainable_state(self.model, {k: t.to(self.device) for k, t in self.global_tensors.items()})
        record.update(evaluate_global(self.model, self.cfg, self.test_set, self.validation_set, self.device, due))
        return record

    def shared_keys(self) -> list[str]:
        """Tensors that travel in a training exchange under the current GAL."""
        return self.method.shared_keys(self.global_tensors, self.gal, block_index)

    # checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue after a completed exchange."""
        return {"global_tensors": OrderedDict((k, v.clone()) for k, v in self.global_tensors.items()),
                "gal": None if self.gal is None else list(self.gal), "phase": self.phase, "round": self.round,
                "layer_scores": self.layer_scores, "carry": dict(self._carry)}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["global_tensors"].items():
            self.global_tensors[k] = v.float().clone()
        self.gal = None if state["gal"] is None else list(state["gal"])
        self.phase, self.round, self.layer_scores = state["phase"], state["round"], state["layer_scores"]
        self._carry = dict(state["carry"])

    # internals ------------------------------------------------------------------------------------------
    def _download_bytes(self) -> int:
        """Tensor bytes of this exchange's Download (what download() sends, without copying it)."""
        keys = list(self.global_tensors) if self.phase == PHASE_SCORE else self.shared_keys()
        itemsize = WIRE_DTYPES[self.cfg.comm_args.payload_dtype].itemsize
        return sum(self.global_tensors[k].numel() for k in keys) * itemsize

    def _select_gal(self, uploads: list[Upload]) -> None:
        scored = [(u.layer_scores, float(u.num_samples)) for u in uploads if u.layer_scores is not None]
        if not scored:
            raise FibecError("GAL selection: no device sent layer scores")
        self.layer_scores = alg.weighted_mean_scores(scored)
        fb = self.cfg.fibec_args
        self.gal = alg.select_gal(self.layer_scores, ratio=fb.gal_ratio, mass=fb.gal_mass, shape=fb.gal_shape)
        log.info("GAL selected: blocks %s of %d (layer scores %s)", self.gal, self.num_blocks,
                 [round(float(x), 4) for x in self.layer_scores])

    def _check(self, uploads: list[Upload]) -> tuple[list[Upload], list[Upload]]:
        """Split uploads into those matching the current GAL and those rejected (logged)."""
        wire = WIRE_DTYPES[self.cfg.comm_args.payload_dtype]
        shapes = {k: tuple(self.global_tensors[k].shape) for k in self.shared_keys()}
        accepted, rejected = [], []
        for u in uploads:
            try:
                alg.check_rows(u.rows, shapes, device_id=u.device_id)
                # a row-sparse tensor holds only its listed rows
                expected = {k: ((len(u.rows[k]), *s[1:]) if k in u.rows else s, wire) for k, s in shapes.items()}
                alg.check_payload(u.tensors, expected, device_id=u.device_id)
                if not u.num_samples > 0:
                    raise alg.PayloadError(f"device {u.device_id}: num_samples must be positive")
                accepted.append(u)
            except alg.PayloadError as exc:
                log.error("rejected upload: %s", exc)
                rejected.append(u)
        if not accepted:
            raise FibecError(f"round {self.round}: every upload was rejected; see the log for each device")
        return accepted, rejected
