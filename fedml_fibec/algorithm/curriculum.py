"""Adaptive curriculum: pacing function, easy-to-hard order and minibatch draws (FIBECFED.md section 1)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _ceil(x: float) -> int:
    """Ceiling that ignores float noise such as 0.7 * 10 == 7.000000000000001."""
    return math.ceil(round(x, 9))


def pacing(t: float, *, g0: float, T_c: float, p: float) -> float:
    """Share of a device's data in use at round t: g(t) = min(1, g0 + (1 - g0) * (t / T_c) ** p)."""
    if not 0.0 <= g0 <= 1.0:
        raise ValueError(f"g0 must be in [0, 1], got {g0}")
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p}")
    if T_c <= 0:
        return 1.0
    return min(1.0, g0 + (1.0 - g0) * (max(t, 0.0) / T_c) ** p)


def curriculum_size(t: float, n_total: int, *, g0: float, T_c: float, p: float, min_samples: int) -> int:
    """Number of easiest samples used at round t: max(min_samples, ceil(g(t) * n_total)), at most n_total."""
    if n_total < 0 or min_samples < 0:
        raise ValueError(f"n_total and min_samples must be >= 0, got {n_total}, {min_samples}")
    return min(n_total, max(min_samples, _ceil(pacing(t, g0=g0, T_c=T_c, p=p) * n_total)))


def easiest_first(scores: Tensor, labels: Tensor | None = None) -> Tensor:
    """Sample indices ordered from easy (low score) to hard; ties keep index order.

    With `labels`, the order is stratified: every prefix holds each class in about its share of
    the data, easiest first within the class. A sample's key is its rank fraction inside its class.
    """
    scores = scores.reshape(-1)
    if labels is None:
        return torch.sort(scores, stable=True).indices
    labels = labels.reshape(-1).to(scores.device)
    key = torch.empty_like(scores, dtype=torch.float64)
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).reshape(-1)
        ranked = members[torch.sort(scores[members], stable=True).indices]
        key[ranked] = (torch.arange(len(ranked), dtype=torch.float64, device=scores.device) + 0.5) / len(ranked)
    return torch.sort(key, stable=True).indices


def curriculum_batches(
    order: Tensor, n_use: int, *, batch_size: int, num_steps: int, generator: torch.Generator
) -> list[Tensor]:
    """num_steps random minibatches of sample indices drawn from the easiest n_use samples of `order`."""
    if not 0 < n_use <= order.numel():
        raise ValueError(f"n_use must be in [1, {order.numel()}], got {n_use}")
    if batch_size < 1 or num_steps < 0:
        raise ValueError(f"batch_size must be >= 1 and num_steps >= 0, got {batch_size}, {num_steps}")
    # Sorted by index, so with n_use == N the draw is exactly the plain draw over arange(N).
    subset = order.reshape(-1)[:n_use].sort().values
    size = min(batch_size, n_use)
    needed = size * num_steps
    perms = [torch.randperm(n_use, generator=generator, device=generator.device)
             for _ in range(-(-needed // n_use))]
    stream = torch.cat(perms) if perms else torch.zeros(0, dtype=torch.long, device=generator.device)
    draws = subset[stream[:needed].to(subset.device)]
    return list(draws.view(num_steps, size).unbind(0)) if num_steps else []


def local_step_count(n_use: int, *, batch_size: int, epochs: float | None, max_steps: int | None) -> int:
    """Optimizer steps of one local round: `epochs` passes over the n_use samples the device uses
    (at least one step), capped by max_steps; without epochs, max_steps itself (fixed local work)."""
    if epochs is None:
        if max_steps is None:
            raise ValueError("local work needs epochs or a number of steps")
        return int(max_steps)
    steps = max(1, _ceil(epochs * n_use / min(batch_size, n_use)))
    return steps if max_steps is None else min(steps, int(max_steps))


def local_batches(n_total: int, *, batch_size: int, num_steps: int, generator: torch.Generator) -> list[Tensor]:
    """The plain (no curriculum) draw: the curriculum draw over all samples."""
    return curriculum_batches(torch.arange(n_total), n_total, batch_size=batch_size, num_steps=num_steps,
                              generator=generator)
