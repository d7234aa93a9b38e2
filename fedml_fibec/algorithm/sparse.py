"""Sparse update of device-local (non-GAL) LoRA tensors by Fisher neuron scores (FIBECFED.md section 3).

A neuron is a row (dim 0) of a LoRA matrix.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def squared_grad_hooks(acc: dict[str, Tensor], params: Mapping[str, nn.Parameter]) -> list:
    """Hooks adding grad ** 2 (float32) into acc[name] at every backward pass; remove them when done.

    A hook sees the gradient as autograd produces it, before clipping and before a sparse mask
    zeroes rows, so every row of a trained module gets a true score at no extra backward pass.
    """
    def hook_for(name: str):
        def hook(grad: Tensor) -> None:
            sq = grad.detach().float() ** 2
            acc[name] = sq if name not in acc else acc[name] + sq
        return hook
    return [p.register_hook(hook_for(name)) for name, p in params.items()]


def neuron_scores(sq_grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-row sums of squared gradients, one score per neuron."""
    return {name: t.reshape(t.shape[0], -1).sum(dim=1) if t.dim() else t.reshape(1) for name, t in sq_grads.items()}


def momentum_update(prev: Mapping[str, Tensor] | None, new: Mapping[str, Tensor], beta: float) -> dict[str, Tensor]:
    """U = beta * prev + (1 - beta) * new per key; a key without history (or prev None) takes new as is.

    Keys only in prev are dropped: those modules are no longer scored (e.g. they joined the GAL).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    out = {}
    for name, u in new.items():
        old = None if prev is None else prev.get(name)
        if old is None:
            out[name] = u.clone()
        elif old.shape != u.shape:
            raise ValueError(f"momentum shape changed for {name}: {tuple(old.shape)} -> {tuple(u.shape)}")
        else:
            out[name] = beta * old.to(u.device) + (1.0 - beta) * u
    return out


def select_top_neurons(scores: Mapping[str, Tensor], rho: float, per_module: bool = False) -> dict[str, Tensor]:
    """Row masks keeping the top ceil(rho * total rows) neurons ranked jointly across all modules, or
    with per_module the top ceil(rho * rows) of every module on its own.

    Ties go to the earlier module (mapping order), then the lower row.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if not scores:
        return {}
    if per_module:
        return {n: select_top_neurons({n: s}, rho)[n] for n, s in scores.items()}
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    device = scores[names[0]].device
    flat = torch.cat([scores[n].reshape(-1).to(device=device, dtype=torch.float32) for n in names])
    k = math.ceil(round(rho * flat.numel(), 9))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    if k >= flat.numel():
        keep[:] = True
    elif k > 0:
        # NaN (never-scored) neurons rank last rather than first.
        ranked = torch.nan_to_num(flat, nan=-math.inf)
        keep[torch.sort(ranked, descending=True, stable=True).indices[:k]] = True
    return {n: m.to(scores[n].device) for n, m in zip(names, keep.split(sizes))}


class SparseUpdate:
    """Restrict training of `params` to the rows selected in `row_masks`; unselected values stay bit-identical.

    Modules with no selected row are frozen (no weight gradient is computed); others get a gradient
    hook zeroing unselected rows, and `after_step()` (call it after each optimizer step) writes back
    the unselected rows, which undoes weight decay and optimizer momentum on them.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], row_masks: Mapping[str, Tensor]) -> None:
        missing, extra = sorted(set(params) - set(row_masks)), sorted(set(row_masks) - set(params))
        if missing or extra:
            raise ValueError(f"row_masks must match params: missing {missing}, unexpected {extra}")
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        self._handles = []
        self._restore: list[tuple[nn.Parameter, Tensor, Tensor]] = []
        for name, p in params.items():
            mask = row_masks[name].to(device=p.device, dtype=torch.bool).reshape(-1)
            rows = p.shape[0] if p.dim() else 1
            if mask.numel() != rows:
                raise ValueError(f"mask for {name} has {mask.numel()} rows, parameter has {rows}")
            selected = int(mask.sum())
            if selected == 0:
                # Frozen with grad None: torch optimizers skip it entirely, so no snapshot is needed.
                self._frozen.append((p, p.requires_grad))
                p.requires_grad_(False)
                p.grad = None
            elif selected < rows:
                drop = (~mask).view(-1, *([1] * (p.dim() - 1)))
                self._handles.append(p.register_hook(lambda g, drop=drop: g.masked_fill(drop, 0)))
                idx = (~mask).nonzero().view(-1)
                self._restore.append((p, idx, p.detach().index_select(0, idx).clone()))

    def after_step(self) -> None:
        """Write the snapshot back into the unselected rows."""
        with torch.no_grad():
            for p, idx, values in self._restore:
                p.index_copy_(0, idx, values)

    def close(self) -> None:
        """Remove the hooks and restore requires_grad."""
        for h in self._handles:
            h.remove()
        for p, requires_grad in self._frozen:
            p.requires_grad_(requires_grad)
        self._handles, self._frozen, self._restore = [], [], []

    def __enter__(self) -> SparseUpdate:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
