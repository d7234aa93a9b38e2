"""What each method of our cross-silo engine shares, freezes and needs: one record per method.

Every place that used to branch on the method's name (payload keys, the trainer's frozen tensors,
whether the server needs a layer-scoring exchange, whether the curriculum and the sparse update
apply) asks the method's record instead. FedML's own algorithms (FedAvg, FedProx, FedOpt, FedNova
on the simulation engine) share every trainable tensor and are not listed here: FedML's code
decides what they do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

BlockOf = Callable[[str], Optional[int]]


@dataclass(frozen=True)
class Method:
    """A federated LoRA method as the device round and the server round see it."""

    name: str
    description: str
    # FibecFed: curriculum, global aggregation layers (GAL) and sparse update of device-local LoRA.
    fibec: bool = False
    # A substring of the tensor names the method never trains (FFA-LoRA: LoRA A stays at its init).
    frozen_marker: Optional[str] = None
    # A substring of the tensor names the method keeps on the device (FedSA-LoRA: LoRA B).
    local_marker: Optional[str] = None

    def shared_keys(self, keys: Iterable[str], gal: Optional[Iterable[int]], block_of: BlockOf) -> list[str]:
        """Tensors that travel between server and devices, in `keys` order.

        Layer-selective methods send the head (no block) and every tensor of a GAL block (gal None =
        all blocks); FFA-LoRA leaves out its frozen A, FedSA-LoRA its device-local B.
        """
        keys = list(keys)
        for marker in (self.frozen_marker, self.local_marker):
            if marker is not None:
                keys = [k for k in keys if marker not in k]
        gal_set = None if gal is None else set(gal)
        return [k for k in keys if gal_set is None or block_of(k) is None or block_of(k) in gal_set]

    def frozen_keys(self, keys: Iterable[str]) -> list[str]:
        """Trainable tensors the method never updates."""
        return [] if self.frozen_marker is None else [k for k in keys if self.frozen_marker in k]

    def selects_layers(self, gal_ratio: Optional[float]) -> bool:
        """Whether the server scores layers and selects a GAL (an extra exchange before round 0).

        gal_ratio = 1 keeps every block global, so there is nothing to select.
        """
        return self.fibec and not (gal_ratio is not None and gal_ratio >= 1)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("FibecFed", "curriculum + global aggregation layers + sparse local update", fibec=True),
    Method("FedAvg", "every LoRA tensor and the head averaged (FedAvg-LoRA)"),
    Method("FFA-LoRA", "LoRA A frozen at its shared init; B and head trained and sent", frozen_marker=".lora_A."),
    Method("FedSA-LoRA", "LoRA A and head shared; B kept on the device", local_marker=".lora_B."),
)}


def method_of(name: str) -> Method:
    """The record of a method of our engine (the config has checked the name)."""
    return METHODS[name]
