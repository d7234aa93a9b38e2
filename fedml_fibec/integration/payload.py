"""What travels between server and devices: the message layout, shared keys and wire dtype."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Optional

import torch

from ..algorithm import payload_bytes

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PHASE_SCORE = "score"  # devices only score layer sensitivity; the server then selects the GAL
PHASE_TRAIN = "train"


def shared_keys(keys: Iterable[str], gal: Optional[Iterable[int]], block_of: Callable[[str], Optional[int]],
                method: str = "FedAvg") -> list[str]:
    """Keys that travel between server and devices under `method`.

    FedAvg/FibecFed: the head (no block) and every tensor of a GAL block (gal None = all blocks).
    FFA-LoRA: everything but LoRA A (frozen at its shared initial value). FedSA-LoRA: everything
    but LoRA B (kept on the device).
    """
    if method == "FFA-LoRA":
        return [k for k in keys if ".lora_A." not in k]
    if method == "FedSA-LoRA":
        return [k for k in keys if ".lora_B." not in k]
    gal_set = None if gal is None else set(gal)
    return [k for k in keys if block_of(k) is None or gal_set is None or block_of(k) in gal_set]


def frozen_keys(keys: Iterable[str], method: str) -> list[str]:
    """Trainable tensors a method never updates (FFA-LoRA freezes LoRA A)."""
    return [k for k in keys if ".lora_A." in k] if method == "FFA-LoRA" else []


def to_wire(tensors: Mapping[str, torch.Tensor], dtype: str) -> "OrderedDict[str, torch.Tensor]":
    """Detached CPU copies in the wire dtype (pickled by FedML's backends)."""
    wire = WIRE_DTYPES[dtype]
    return OrderedDict((k, v.detach().to("cpu", wire, copy=True)) for k, v in tensors.items())


def download_message(round_idx: int, phase: str, gal: Optional[list[int]],
                     tensors: Mapping[str, torch.Tensor], rescore: bool = False) -> "OrderedDict":
    """Server -> device. An OrderedDict, because FedML reads a plain dict as per-client payloads."""
    return OrderedDict(round=round_idx, phase=phase, gal=None if gal is None else list(gal),
                       tensors=OrderedDict(tensors), rescore=rescore)


def upload_message(device_id: int, num_samples: int, tensors: Mapping[str, torch.Tensor],
                   layer_scores: Optional[torch.Tensor] = None, stats: Optional[dict] = None) -> dict:
    """Device -> server. A plain dict, so FedML hands it to our aggregator untouched."""
    return {"device_id": int(device_id), "num_samples": int(num_samples), "tensors": OrderedDict(tensors),
            "layer_scores": None if layer_scores is None else layer_scores.detach().float().cpu(),
            "stats": dict(stats or {})}


def upload_bytes(message: Mapping) -> int:
    """Tensor bytes of an upload (tensors and layer scores)."""
    scores = message.get("layer_scores")
    return payload_bytes(message["tensors"]) + (0 if scores is None else scores.numel() * scores.element_size())
