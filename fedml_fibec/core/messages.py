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


INDEX_BYTES = 4  # a row index counts as an int32 in the upload's bytes


def select_rows(tensors: Mapping[str, torch.Tensor], row_masks: Mapping[str, torch.Tensor]
                ) -> "tuple[OrderedDict[str, torch.Tensor], dict[str, torch.Tensor]]":
    """Row-sparse form of a payload: a tensor whose mask leaves rows out keeps only its selected rows,
    and `rows` lists them (int64, ascending); the others stay whole."""
    out, rows = OrderedDict(), {}
    for k, v in tensors.items():
        mask = row_masks.get(k)
        if mask is not None and not bool(mask.all()):
            idx = mask.reshape(-1).nonzero().reshape(-1).to(device="cpu", dtype=torch.int64)
            out[k], rows[k] = v.index_select(0, idx.to(v.device)).contiguous(), idx
        else:
            out[k] = v
    return out, rows


@dataclass
class Upload:
    """Device -> server: one device's trained shared tensors (or layer scores) and round statistics.

    `rows` makes a tensor row-sparse: `tensors[k]` then holds only the rows `rows[k]` (ascending), the
    rows the device's sparse update could change; every other row is, bit for bit, the value the
    device downloaded, so the server fills them in from the Download it sent (`dense_tensors`).
    """

    device_id: int
    num_samples: int  # samples the device used this round: the aggregation weight
    tensors: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    layer_scores: Optional[torch.Tensor] = None
    stats: dict = field(default_factory=dict)
    reply_to: Optional[list] = None  # the Download.tag this upload answers
    rows: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device_id, self.num_samples = int(self.device_id), int(self.num_samples)
        self.tensors = OrderedDict(self.tensors)
        self.rows = {k: torch.as_tensor(v, dtype=torch.int64).reshape(-1) for k, v in (self.rows or {}).items()}
        if self.layer_scores is not None:
            self.layer_scores = self.layer_scores.detach().float().cpu()

    @property
    def nbytes(self) -> int:
        """Bytes of the upload: tensors, row indices (as int32) and layer scores."""
        scores = self.layer_scores
        return (payload_bytes(self.tensors) + INDEX_BYTES * sum(r.numel() for r in self.rows.values())
                + (0 if scores is None else scores.numel() * scores.element_size()))

    def dense_tensors(self, downloaded: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        """The whole tensors: each row-sparse one is the downloaded tensor (`downloaded`, in the wire dtype)
        with the sent rows written in, which is exactly what the device holds."""
        out = OrderedDict()
        for k, v in self.tensors.items():
            if k in self.rows:
                full = downloaded[k].to(dtype=v.dtype, copy=True)
                full.index_copy_(0, self.rows[k].to(full.device), v.to(full.device))
                out[k] = full
            else:
                out[k] = v
        return out

    def to_fedml(self) -> dict:
        """FedML's form: a plain dict, which FedML hands to our aggregator untouched."""
        return {"device_id": self.device_id, "num_samples": self.num_samples, "tensors": OrderedDict(self.tensors),
                "layer_scores": self.layer_scores, "stats": dict(self.stats), "reply_to": self.reply_to,
                "rows": dict(self.rows)}

    @classmethod
    def from_fedml(cls, message: Mapping[str, Any]) -> "Upload":
        return cls(device_id=message["device_id"], num_samples=message["num_samples"], tensors=message["tensors"],
                   layer_scores=message.get("layer_scores"), stats=dict(message.get("stats") or {}),
                   reply_to=message.get("reply_to"), rows=dict(message.get("rows") or {}))
