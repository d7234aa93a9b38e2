"""Faults that tests ask for, read once from the environment; a normal run has none.

Kept apart so the server and client loops carry one call each (`faults.crash_now`,
`faults.corrupt`) instead of environment lookups on their production paths.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ...core.messages import PHASE_TRAIN
from ...errors import FibecError

log = logging.getLogger("fedml_fibec")

ENV_STOP_AFTER_ROUND = "FEDML_FIBEC_STOP_AFTER_ROUND"  # server: checkpoint round k, then exit (crash)
ENV_CORRUPT_UPLOAD = "FEDML_FIBEC_CORRUPT_UPLOAD"  # client: NaN in its upload of training round k


class SimulatedCrash(FibecError):
    """FEDML_FIBEC_STOP_AFTER_ROUND: the server stopped on purpose after a checkpoint."""


@dataclass(frozen=True)
class FaultPlan:
    stop_after_round: Optional[int] = None
    corrupt_upload_round: Optional[int] = None

    @classmethod
    def from_environment(cls) -> "FaultPlan":
        def read(name: str) -> Optional[int]:
            value = os.environ.get(name)
            return None if value is None else int(value)
        return cls(read(ENV_STOP_AFTER_ROUND), read(ENV_CORRUPT_UPLOAD))

    def crash_now(self, phase: str, round_idx: int) -> bool:
        """Server, after checkpointing: whether to stop here as if it had crashed."""
        return self.stop_after_round is not None and phase == PHASE_TRAIN and round_idx == self.stop_after_round

    def corrupt(self, upload: dict) -> None:
        """Client: put NaN into the first tensor of an upload answering the chosen training round."""
        if self.corrupt_upload_round is None or upload.get("reply_to") != [self.corrupt_upload_round, PHASE_TRAIN] \
                or not upload["tensors"]:
            return
        key = next(iter(upload["tensors"]))
        upload["tensors"][key] = torch.full_like(upload["tensors"][key], float("nan"))
        log.warning("%s: sending a NaN upload for round %s on purpose", ENV_CORRUPT_UPLOAD, self.corrupt_upload_round)
