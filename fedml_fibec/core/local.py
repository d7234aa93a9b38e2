"""Local training and evaluation steps shared by the device trainer and the server (plain torch)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..data import EncodedSet
from ..models.prefix_cache import FrozenPrefixCache


def model_inputs(data: EncodedSet, idx, device: torch.device) -> dict[str, torch.Tensor]:
    """The rows `idx` as model inputs on `device`, without the columns that are padding in every row.

    Padding is on the right, so a batch of short texts runs at its own length, not max_seq_length.
    """
    mask = data.attention_mask[idx]
    length = int(mask.sum(dim=1).max().item())
    inputs = {"input_ids": data.input_ids[idx][:, :length], "attention_mask": mask[:, :length]}
    if data.token_type_ids is not None:
        inputs["token_type_ids"] = data.token_type_ids[idx][:, :length]
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def length_sorted_batches(attention_mask: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Row indices in batches of similar length, so trimmed batches carry little padding."""
    order = torch.argsort(attention_mask.sum(dim=1), stable=True)
    return list(order.split(batch_size))


def round_lr_scale(round_idx: int, total_rounds: int, schedule: str, min_ratio: float) -> float:
    """Factor on the local learning rate in a round: 1, or cosine from 1 down to min_ratio."""
    if schedule == "constant" or total_rounds <= 1:
        return 1.0
    progress = min(1.0, round_idx / (total_rounds - 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, *,
                   head_lr: Optional[float] = None, head_names: Sequence[str] = ()) -> torch.optim.Optimizer:
    """A fresh local optimizer over the parameters that require grad; the head may have its own lr."""
    head = set(head_names) if head_lr is not None else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n not in head], "lr": lr}]
    if head:
        groups.append({"params": [p for n, p in named if n in head], "lr": head_lr})
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_steps(model: nn.Module, data: EncodedSet, batches: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, *, device: torch.device,
                max_grad_norm: float = 0.0, bf16: bool = False,
                after_step: Optional[Callable[[], None]] = None,
                extra_loss: Optional[Callable[[], torch.Tensor]] = None,
                prefix: Optional[FrozenPrefixCache] = None) -> float:
    """Run one optimizer step per index batch; return the mean training loss.

    With `prefix` (every sample's output of the frozen blocks below the lowest trained one), those
    blocks are not run: each batch replays its cached hidden states.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros((), device=device)
    replay = prefix.replaying(model) if prefix is not None else contextlib.nullcontext()
    with replay:
        for idx in batches:
            total += _train_step(model, data, idx, optimizer, device=device, params=params, max_grad_norm=max_grad_norm,
                                 bf16=bf16, after_step=after_step, extra_loss=extra_loss, prefix=prefix)
    return float(total.item()) / max(1, len(batches))


def _train_step(model, data, idx, optimizer, *, device, params, max_grad_norm, bf16, after_step, extra_loss,
                prefix) -> torch.Tensor:
    """One optimizer step on the rows `idx`; returns the detached loss."""
    inputs, y = model_inputs(data, idx, device), data.labels[idx].to(device)
    if prefix is not None:
        prefix.select(idx, device)
    with _autocast(device, bf16):
        logits = model(**inputs).logits
    loss = nn.functional.cross_entropy(logits.float(), y)
    if extra_loss is not None:
        loss = loss + extra_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if after_step is not None:
        after_step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, data: EncodedSet, *, batch_size: int, device: torch.device, bf16: bool = False) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the model on a set."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    n = len(data)
    for rows in length_sorted_batches(data.attention_mask, batch_size):
        y = data.labels[rows].to(device)
        with _autocast(device, bf16):
            logits = model(**model_inputs(data, rows, device)).logits.float()
        correct += (logits.argmax(dim=-1) == y).sum()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
    model.train(was_training)
    return float(correct.item()) / max(1, n), float(loss_sum.item()) / max(1, n)
