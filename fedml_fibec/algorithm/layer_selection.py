"""Layer importance scores and the choice of global aggregation layers, GAL (FIBECFED.md section 2)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .fisher import eval_mode, lora_parameters, model_device, segment_inputs


def _hidden(output) -> Tensor:
    """A block's hidden state: the output itself, or its first element when it is a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _model_inputs(input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None,
                  device: torch.device) -> dict[str, Tensor]:
    """The model's inputs on `device`, sentence pairs' segment ids included."""
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            **segment_inputs(token_type_ids, device)}


def perturbation_layer_scores(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    blocks: Sequence[nn.Module],
    sigma: float,
    generator: torch.Generator | None = None,
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """Mean over samples of ||h_l(x') - h_l(x)||_F / ||h_l(x)||_F per block, over real tokens only.

    x' adds to each real token's input embedding e Gaussian noise of std sigma * ||e|| / sqrt(dim),
    so the noise norm is about sigma * ||e||. Norms are Frobenius over one sample's (real tokens,
    hidden) matrix, so each sample counts once whatever its length.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if not blocks:
        raise ValueError("blocks is empty")
    device = model_device(model)
    inputs = _model_inputs(input_ids, attention_mask, token_type_ids, device)
    real = inputs["attention_mask"].to(torch.float32).unsqueeze(-1)
    hidden: list[Tensor | None] = [None] * len(blocks)
    noise_sigma = 0.0  # the clean pass first; the hook reads the value current at call time

    def perturb(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
        if not noise_sigma:
            return None
        gen_device = generator.device if generator is not None else out.device
        noise = torch.randn(out.shape, generator=generator, device=gen_device, dtype=torch.float32).to(out.device)
        scale = noise_sigma * out.float().norm(dim=-1, keepdim=True) / math.sqrt(out.shape[-1])
        return out + (noise * scale * real).to(out.dtype)

    def keeper(i: int):
        def keep(_module: nn.Module, _args: tuple, out) -> None:
            hidden[i] = _hidden(out).float()
        return keep

    handles = [model.get_input_embeddings().register_forward_hook(perturb)]
    handles += [block.register_forward_hook(keeper(i)) for i, block in enumerate(blocks)]
    try:
        with eval_mode(model), torch.no_grad():
            model(**inputs)
            clean = list(hidden)
            noise_sigma = float(sigma)
            model(**inputs)
            noisy = list(hidden)
    finally:
        for h in handles:
            h.remove()
    if any(h is None for h in clean):
        raise RuntimeError("a block in `blocks` did not run in the forward pass")
    scores = []
    for h, h_noisy in zip(clean, noisy):
        diff = ((h_noisy - h) * real).square().sum(dim=(1, 2)).sqrt()
        base = (h * real).square().sum(dim=(1, 2)).sqrt()
        scores.append((diff / base.clamp(min=torch.finfo(torch.float32).tiny)).mean())
    return torch.stack(scores)


def grad_sensitivity_layer_scores(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    block_of: Callable[[str], int | None],
    num_blocks: int,
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """Mean |theta * dL/dtheta| over the elements of each block's LoRA tensors (L = mean cross-entropy).

    Note: at peft's default init lora_B == 0, so every score is 0 until the adapters have trained.
    """
    named = [(name, p, block_of(name)) for name, p in lora_parameters(model)]
    named = [(name, p, b) for name, p, b in named if b is not None]
    if not named:
        raise ValueError("no trainable LoRA tensor maps to a block")
    bad = sorted({b for _, _, b in named if not 0 <= b < num_blocks})
    if bad:
        raise ValueError(f"block_of returned indices {bad} outside [0, {num_blocks})")
    device = model_device(model)
    with eval_mode(model), torch.enable_grad():
        logits = model(**_model_inputs(input_ids, attention_mask, token_type_ids, device)).logits
        loss = nn.functional.cross_entropy(logits.float(), labels.to(device))
        grads = torch.autograd.grad(loss, [p for _, p, _ in named])
    totals = torch.zeros(num_blocks, dtype=torch.float32, device=device)
    counts = torch.zeros(num_blocks, dtype=torch.float32, device=device)
    for (_, p, b), g in zip(named, grads):
        totals[b] += (p.detach().float() * g.float()).abs().sum()
        counts[b] += p.numel()
    return totals / counts.clamp(min=1)


def weighted_mean_scores(scores: Sequence[tuple[Tensor, float]]) -> Tensor:
    """sum_i w_i s_i / sum_i w_i in float32 (e.g. devices' layer scores weighted by data size)."""
    if not scores:
        raise ValueError("no scores to average")
    total_weight = float(sum(w for _, w in scores))
    if any(w < 0 for _, w in scores) or total_weight <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {[w for _, w in scores]}")
    device = scores[0][0].device
    acc = torch.zeros_like(scores[0][0], dtype=torch.float32)
    for s, w in scores:
        if s.shape != acc.shape:
            raise ValueError(f"score shapes differ: {tuple(s.shape)} vs {tuple(acc.shape)}")
        acc += float(w) * s.to(device=device, dtype=torch.float32)
    return acc / total_weight


def select_gal(scores: Tensor, *, ratio: float | None = None, mass: float | None = None,
               shape: str = "scored") -> list[int]:
    """Sorted block indices of the GAL.

    shape="scored" (the paper): the top ceil(ratio * L) blocks by score, or the fewest top blocks holding
    `mass` of the total; ties go to the lower index, so all-zero scores under `mass` select block 0 alone.
    shape="suffix": the last blocks, ceil(ratio * L) of them, or the shortest run of last blocks holding
    `mass` of the total. With the blocks below frozen, backward then stops at the GAL's lowest block.
    """
    if shape not in ("scored", "suffix"):
        raise ValueError(f"shape must be 'scored' or 'suffix', got {shape!r}")
    if (ratio is None) == (mass is None):
        raise ValueError("give exactly one of ratio or mass")
    values = scores.detach().reshape(-1).double().cpu()
    n = values.numel()
    if n == 0:
        raise ValueError("scores is empty")
    if not torch.isfinite(values).all():
        raise ValueError(f"scores must be finite, got {values.tolist()}")
    # Stable descending sort: equal scores keep index order, so ties go to the lower index.
    # A suffix is "ranked" from the last block down, whatever the scores.
    order = (torch.sort(values, descending=True, stable=True).indices if shape == "scored"
             else torch.arange(n - 1, -1, -1))
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        k = math.ceil(round(ratio * n, 9))
    else:
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        if (values < 0).any():
            raise ValueError(f"mass selection needs non-negative scores, got {values.tolist()}")
        total = values.sum().item()
        cum = values[order].cumsum(0)
        # Relative tolerance so that mass=1 reaches the total despite rounding in the cumsum.
        k = int((cum < mass * total * (1 - 1e-12)).sum().item()) + 1
    return sorted(order[: min(max(k, 1), n)].tolist())
