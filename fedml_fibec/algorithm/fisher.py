"""Per-sample difficulty: the trace of the Fisher information of log p(y|x) (FIBECFED.md section 1).

The one-pass functions get every sample's gradient out of a single backward pass of the summed
log-likelihood: in eval mode the samples of a batch do not interact, so the gradient of the sum
with respect to a per-sample intermediate (an embedding row, a LoRA layer's output) is that
sample's own gradient. `per_sample_fisher_scores` is the slow loop they are tested against.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

WRT = ("embeddings", "lora", "logits")
FISHER = ("empirical", "true")
NORMALIZE = ("none", "tokens")


def _check_options(wrt: str, fisher: str, normalize: str) -> None:
    """Raise ValueError on an unknown option value."""
    for name, value, allowed in (("wrt", wrt, WRT), ("fisher", fisher, FISHER), ("normalize", normalize, NORMALIZE)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own previous mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def lora_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules holding LoRA A/B weights (peft names them '...lora_A.<adapter>')."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B"):
            if module.weight.requires_grad:
                found.append((name, module))
    return found


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable LoRA A/B weights (and biases, if any), by name."""
    return [
        (f"{name}.{pname}", p)
        for name, module in lora_linears(model)
        for pname, p in module.named_parameters(recurse=False)
        if p.requires_grad
    ]


def _log_probs(model: nn.Module, **inputs: Tensor) -> Tensor:
    """Log-softmax of a sequence classifier's logits, shape (B, C), in float32."""
    logits = model(**inputs).logits
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ValueError(f"expected classifier logits of shape (batch, classes>=2), got {tuple(logits.shape)}")
    return torch.log_softmax(logits.float(), dim=-1)


def segment_inputs(token_type_ids: Tensor | None, device: torch.device) -> dict[str, Tensor]:
    """The segment ids as model inputs, if there are any: a sentence pair's second text is segment 1 on
    BERT-family models, and scoring without them would score other inputs than the ones trained on."""
    if token_type_ids is None:
        return {}
    return {"token_type_ids": token_type_ids.to(device)}


def _objectives(log_probs: Tensor, labels: Tensor, fisher: str) -> list[tuple[Tensor, Tensor | None]]:
    """(summed log-likelihood, per-sample weight) pairs whose weighted squared grads give the trace."""
    if fisher == "empirical":
        return [(log_probs.gather(1, labels.reshape(-1, 1).to(log_probs.device)).sum(), None)]
    # True Fisher: E_{y~p(.|x)} ||grad log p(y|x)||^2, one backward per class; p is a weight, not a path.
    probs = log_probs.detach().exp()
    return [(log_probs[:, c].sum(), probs[:, c]) for c in range(log_probs.shape[1])]


def _normalize(scores: Tensor, attention_mask: Tensor, normalize: str) -> Tensor:
    """Divide by the real-token count when normalize == 'tokens'."""
    if normalize == "tokens":
        return scores / attention_mask.sum(dim=1).clamp(min=1).to(scores.dtype)
    return scores


def embedding_fisher_scores(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    fisher: str = "empirical",
    normalize: str = "none",
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """Trace of each sample's Fisher w.r.t. its input token embeddings, from one batched backward."""
    _check_options("embeddings", fisher, normalize)
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    captured: list[Tensor] = []

    def keep_output(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        # A fresh leaf when the embedding table is frozen (LoRA), so autograd.grad can target it.
        out = output if output.requires_grad else output.detach().requires_grad_(True)
        captured.append(out)
        return out

    # input_ids keep flowing into the model: Llama-style classifiers find the pooled (last real)
    # position from them, which they cannot do from inputs_embeds (FIBECFED.md, pitfall).
    handle = model.get_input_embeddings().register_forward_hook(keep_output)
    try:
        with eval_mode(model), torch.enable_grad():
            log_probs = _log_probs(model, input_ids=input_ids, attention_mask=attention_mask,
                                   **segment_inputs(token_type_ids, device))
            if len(captured) != 1:
                raise RuntimeError(f"input embedding module ran {len(captured)} times in one forward, expected 1")
            emb = captured[0]
            real = attention_mask.to(torch.float32).unsqueeze(-1)
            scores = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=device)
            objectives = _objectives(log_probs, labels, fisher)
            for i, (objective, weight) in enumerate(objectives):
                (grad,) = torch.autograd.grad(objective, emb, retain_graph=i < len(objectives) - 1)
                per_sample = (grad.float().square() * real).sum(dim=(1, 2))
                scores += per_sample if weight is None else weight * per_sample
    finally:
        handle.remove()
    return _normalize(scores, attention_mask, normalize)


def logit_fisher_scores(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    fisher: str = "empirical",
    normalize: str = "none",
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """Trace of each sample's Fisher w.r.t. its logits z, in closed form from one forward pass (no backward).

    grad_z log p(y|x) = e_y - p, so the empirical trace is ||e_y - p||^2 = 1 - 2 p_y + sum_c p_c^2 and
    the true one, its expectation over y ~ p, is 1 - sum_c p_c^2.
    """
    _check_options("logits", fisher, normalize)
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with eval_mode(model), torch.no_grad():
        probs = _log_probs(model, input_ids=input_ids, attention_mask=attention_mask,
                           **segment_inputs(token_type_ids, device)).exp()
    sum_sq = probs.square().sum(dim=1)
    if fisher == "empirical":
        p_y = probs.gather(1, labels.reshape(-1, 1).to(device)).squeeze(1)
        scores = 1.0 - 2.0 * p_y + sum_sq
    else:
        scores = 1.0 - sum_sq
    return _normalize(scores, attention_mask, normalize)


def lora_fisher_scores(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    fisher: str = "empirical",
    normalize: str = "none",
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """Trace of each sample's Fisher w.r.t. all LoRA tensors, from one batched backward."""
    _check_options("lora", fisher, normalize)
    layers = lora_linears(model)
    if not layers:
        raise ValueError("model has no trainable LoRA lora_A/lora_B linear layers")
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    records: list[tuple[nn.Linear, Tensor, Tensor]] = []

    def keep_io(module: nn.Module, args: tuple, output: Tensor) -> None:
        records.append((module, args[0].detach(), output))

    handles = [module.register_forward_hook(keep_io) for _, module in layers]
    try:
        with eval_mode(model), torch.enable_grad():
            log_probs = _log_probs(model, input_ids=input_ids, attention_mask=attention_mask,
                                   **segment_inputs(token_type_ids, device))
            if not records:
                raise RuntimeError("no LoRA layer ran in the forward pass (merged or disabled adapters?)")
            real = attention_mask.to(torch.float32)
            # Zeroing pad tokens' inputs drops their terms, exactly as if they were not there.
            inputs = [_mask_tokens(a.float(), real) for _, a, _ in records]
            outputs = [out for _, _, out in records]
            has_bias = [m.bias is not None and m.bias.requires_grad for m, _, _ in records]
            scores = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=device)
            objectives = _objectives(log_probs, labels, fisher)
            for i, (objective, weight) in enumerate(objectives):
                grads = torch.autograd.grad(objective, outputs, retain_graph=i < len(objectives) - 1,
                                            allow_unused=True)
                per_sample = torch.zeros_like(scores)
                for a, g, bias in zip(inputs, grads, has_bias):
                    if g is None:
                        continue
                    per_sample += _per_sample_linear_sq_norm(a, g.float(), bias, real)
                scores += per_sample if weight is None else weight * per_sample
    finally:
        for h in handles:
            h.remove()
    return _normalize(scores, attention_mask, normalize)


def _mask_tokens(x: Tensor, real: Tensor) -> Tensor:
    """Zero the pad-token rows of a (B, T, ...) activation; other shapes pass through."""
    if x.dim() >= 3 and x.shape[:2] == real.shape:
        return x * real.view(*real.shape, *([1] * (x.dim() - 2)))
    return x


def _per_sample_linear_sq_norm(a: Tensor, g: Tensor, bias: bool, real: Tensor) -> Tensor:
    """||dW_b||^2 (+ ||db_b||^2) per sample b for y = x W^T + b, from inputs a and output grads g."""
    if a.dim() == 2:  # (B, in): no token axis
        sq = g.square().sum(1) * a.square().sum(1)
        return sq + g.square().sum(1) if bias else sq
    a, g = a.flatten(1, -2), g.flatten(1, -2)  # (B, T, in), (B, T, out)
    sq = torch.einsum("bto,bti->boi", g, a).square().sum(dim=(1, 2))
    if bias:
        sq = sq + _mask_tokens(g, real).sum(1).square().sum(1)
    return sq


def per_sample_fisher_scores(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    wrt: str = "embeddings",
    fisher: str = "empirical",
    normalize: str = "none",
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """Reference: a loop of one unpadded sample at a time, one backward per sample (and class)."""
    _check_options(wrt, fisher, normalize)
    device = model_device(model)
    params = [p for _, p in lora_parameters(model)]
    if wrt == "lora" and not params:
        raise ValueError("model has no trainable LoRA lora_A/lora_B linear layers")
    out = []
    with eval_mode(model), torch.enable_grad():
        for b in range(input_ids.shape[0]):
            real = attention_mask[b].bool()
            ids = input_ids[b][real].view(1, -1).to(device)
            mask = torch.ones_like(ids)
            pair = None if token_type_ids is None else token_type_ids[b][real].view(1, -1)
            segments = segment_inputs(pair, device)
            label = labels[b].view(1).to(device)
            if wrt == "embeddings":
                # Unpadded, so inputs_embeds is safe here and keeps the reference independent of hooks.
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                log_probs = _log_probs(model, inputs_embeds=emb, attention_mask=mask, **segments)
                targets = [emb]
            elif wrt == "logits":  # autograd through log-softmax from the logits as a leaf
                logits = model(input_ids=ids, attention_mask=mask, **segments).logits.detach().float().requires_grad_(True)
                log_probs = torch.log_softmax(logits, dim=-1)
                targets = [logits]
            else:
                log_probs = _log_probs(model, input_ids=ids, attention_mask=mask, **segments)
                targets = params
            total = torch.zeros((), dtype=torch.float32, device=device)
            classes = [int(label)] if fisher == "empirical" else range(log_probs.shape[1])
            for c in classes:
                grads = torch.autograd.grad(log_probs[0, c], targets, retain_graph=True, allow_unused=True)
                sq = sum(g.float().square().sum() for g in grads if g is not None)
                total = total + (sq if fisher == "empirical" else log_probs[0, c].detach().exp() * sq)
            out.append(total / ids.shape[1] if normalize == "tokens" else total)
    return torch.stack(out)


def score_dataset(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 32,
    wrt: str = "embeddings",
    fisher: str = "empirical",
    normalize: str = "none",
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """Scores of a whole dataset, batch by batch through the one-pass function for `wrt`."""
    _check_options(wrt, fisher, normalize)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fn = {"embeddings": embedding_fisher_scores, "lora": lora_fisher_scores, "logits": logit_fisher_scores}[wrt]
    parts = [
        fn(model, input_ids[i:i + batch_size], attention_mask[i:i + batch_size], labels[i:i + batch_size],
           fisher=fisher, normalize=normalize,
           token_type_ids=None if token_type_ids is None else token_type_ids[i:i + batch_size])
        for i in range(0, input_ids.shape[0], batch_size)
    ]
    if not parts:
        return torch.zeros(0, dtype=torch.float32, device=model_device(model))
    return torch.cat(parts)
