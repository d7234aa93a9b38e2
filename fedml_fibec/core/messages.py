"""What travels between the server and the devices, as typed messages.

The device round and the server round speak `Download` and `Upload`; an engine converts them to
its transport's form at its edge only (`to_fedml` / `from_fedml` for FedML's pickled messages), so
a new wire format replaces those two conversions and nothing else.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from ..algorithm import payload_bytes

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PHASE_SCORE = "score"  # devices only score layer sensitivity; the server then selects the GAL
PHASE_TRAIN = "train"


def to_wire(tensors: Mapping[str, torch.Tensor], dtype: str) -> "OrderedDict[str, torch.Tensor]":
    """Detached CPU copies in the wire dtype."""
    wire = WIRE_DTYPES[dtype]
    return OrderedDict((k, v.detach().to("cpu", wire, copy=True)) for k, v in tensors.items())


@dataclass
class Download:
    """Server -> device: the global tensors a device needs for one exchange."""

    round: int
    phase: str
    gal: Optional[list[int]]
    tensors: "OrderedDict[str, torch.Tensor]"
    rescore: bool = False  # also send layer scores after training (the GAL is re-selected)

    @property
    def tag(self) -> list:
        """What identifies the exchange (an upload answering it carries the same tag)."""
        return [int(self.round), str(self.phase)]

    def to_fedml(self) -> "OrderedDict":
        """FedML's form: an OrderedDict, because FedML reads a plain dict as per-client payloads."""
        return OrderedDict(round=self.round, phase=self.phase, gal=None if self.gal is None else list(self.gal),
                           tensors=OrderedDict(self.tensors), rescore=self.rescore)

    @classmethod
    def from_fedml(cls, message: Mapping[str, Any]) -> "Download":
        return cls(round=int(message["round"]), phase=str(message["phase"]),
                   gal=None if message["gal"] is None else list(message["gal"]),
                   tensors=OrderedDict(message["tensors"]), rescore=bool(message.get("rescore", False)))


@dataclass
class Upload:
    """Device -> server: one device's trained shared tensors (or layer scores) and round statistics."""

    device_id: int
    num_samples: int  # samples the device used this round: the aggregation weight
    tensors: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    layer_scores: Optional[torch.Tensor] = None
    stats: dict = field(default_factory=dict)
    reply_to: Optional[list] = None  # the Download.tag this upload answers

    def __post_init__(self) -> None:
        self.device_id, self.num_samples = int(self.device_id), int(self.num_samples)
        self.tensors = OrderedDict(self.tensors)
        if self.layer_scores is not None:
            self.layer_scores = self.layer_scores.detach().float().cpu()

    @property
    def nbytes(self) -> int:
        """Tensor bytes of the upload (tensors and layer scores)."""
        scores = self.layer_scores
        return payload_bytes(self.tensors) + (0 if scores is None else scores.numel() * scores.element_size())

    def to_fedml(self) -> dict:
        """FedML's form: a plain dict, which FedML hands to our aggregator untouched."""
        return {"device_id": self.device_id, "num_samples": self.num_samples, "tensors": OrderedDict(self.tensors),
                "layer_scores": self.layer_scores, "stats": dict(self.stats), "reply_to": self.reply_to}

    @classmethod
    def from_fedml(cls, message: Mapping[str, Any]) -> "Upload":
        return cls(device_id=message["device_id"], num_samples=message["num_samples"], tensors=message["tensors"],
                   layer_scores=message.get("layer_scores"), stats=dict(message.get("stats") or {}),
                   reply_to=message.get("reply_to"))
