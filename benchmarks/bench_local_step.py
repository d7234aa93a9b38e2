#!/usr/bin/env python
"""Local step cost: dense LoRA step vs FibecFed's sparse step, and backward depth (issue 6, benchmark 2).

One local optimizer step = fedml_fibec.core.local.train_steps on one batch (default 16 MR snippets
padded to 64 tokens; AdamW lr 2e-3, gradient clipping 1.0: the run defaults), LoRA r=8 on q/v + head.

  dense          every LoRA tensor and the head trainable (FedAvg-LoRA's step)
  fibec          FibecFed's step at the defaults, set up as the device trainer does it in a device's second
                 participation: GAL = top gal_ratio (0.5) of the blocks by perturbation sensitivity on the
                 batch; the LoRA tensors of the other blocks are device-local, scored by squared gradients
                 accumulated over `--score-steps` dense steps (the first participation), and only the top
                 rho (0.25) of their neurons train: SparseUpdate (row-mask gradient hooks, after_step
                 restore, modules without a selected neuron frozen) plus the trainer's squared-gradient
                 accumulator hooks on the local tensors
  lowest_block=k LoRA of blocks < k frozen, the rest dense: backward should stop at block k
  cached_prefix=k  as lowest_block=k, with the blocks below k replayed from the frozen-prefix cache
                 (`cache_frozen_prefix`): neither forward nor backward runs there
Each variant's line carries `blocks_with_backward`: the blocks whose output received a gradient in the
step (a tensor hook on every block output that requires grad). Autograd skips block i exactly when
block i is not listed; `autograd_skips_frozen_lower_blocks` checks that it is the blocks >= the lowest
trainable one and nothing below. A `phases` line splits dense and fibec into forward, backward and
optimizer (+ clip and after_step) time.

    python benchmarks/bench_local_step.py [--models minilm smollm2] [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import contextlib
import statistics
import time

from common import base_parser, context, emit, lora_model, loadavg, paired_ratio_median, ratio, setup, \
    summarize, sync, text_batch

import torch
from torch import nn

from fedml_fibec import algorithm as alg
from fedml_fibec.data import EncodedSet
from fedml_fibec.core.local import make_optimizer, model_inputs, train_steps
from fedml_fibec.models import lora_parameter_names, tensors_by_block, transformer_blocks
from fedml_fibec.models.prefix_cache import FrozenPrefixCache

GAL_RATIO, RHO, BETA, SIGMA, LR, CLIP = 0.5, 0.25, 0.9, 0.1, 2e-3, 1.0


class BackwardProbe:
    """Records which transformer blocks' outputs get a gradient during backward."""

    def __init__(self, blocks):
        self.hit: set[int] = set()
        self.handles = [b.register_forward_hook(self._forward(i)) for i, b in enumerate(blocks)]

    def _forward(self, i):
        def hook(_m, _a, out):
            h = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(h, torch.Tensor) and h.requires_grad:
                h.register_hook(lambda g: self.hit.add(i))
        return hook

    def reset(self):
        self.hit = set()

    def close(self):
        for h in self.handles:
            h.remove()


def module_key(name: str) -> str:
    """'...query.lora_A.default.weight' -> '...query' (one LoRA module = its A and B)."""
    return name.split(".lora_")[0]


class Setup:
    """The trainable-tensor configuration of one variant, entered around each timed step."""

    def __init__(self, model, trainable: set[str], *, masks=None, local_keys=(), label="", prefix=None):
        self.model, self.trainable, self.masks, self.local_keys, self.label = model, trainable, masks, local_keys, label
        self.prefix = prefix  # a filled FrozenPrefixCache, replayed in the step
        self.params = dict(model.named_parameters())
        self.all_names = [n for n in self.params if ".lora_" in n or ".modules_to_save." in n]
        self.optimizer = None
        self.sq_grads: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def active(self):
        for n in self.all_names:
            self.params[n].requires_grad_(n in self.trainable)
        hooks, sparse = [], None
        if self.local_keys:  # the trainer's squared-gradient accumulators on device-local tensors
            for k in self.local_keys:
                if self.params[k].requires_grad:
                    hooks.append(self.params[k].register_hook(_accumulator(self.sq_grads, k)))
        if self.masks is not None:
            sparse = alg.SparseUpdate({k: self.params[k] for k in self.masks}, self.masks)
        if self.optimizer is None:  # created once, after freezing, over what trains (as the trainer does)
            self.optimizer = make_optimizer(self.model, "adamw", LR, 0.0)
        try:
            yield sparse
        finally:
            for h in hooks:
                h.remove()
            if sparse is not None:
                sparse.close()
            for n in self.all_names:
                self.params[n].requires_grad_(True)


def _accumulator(acc, name):
    def hook(grad):  # as FibecClientTrainer._accumulator
        sq = grad.detach().float() ** 2
        acc[name] = sq if name not in acc else acc[name] + sq
    return hook


def fibec_setup(model, data, idx, ids, mask, args) -> tuple[Setup, dict]:
    """GAL by perturbation, neuron masks from a dense first participation, as the trainer does."""
    blocks = transformer_blocks(model)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    layer_scores = alg.perturbation_layer_scores(model, ids, mask, blocks=blocks, sigma=SIGMA, generator=g)
    gal = alg.select_gal(layer_scores.cpu(), ratio=GAL_RATIO)
    lora = lora_parameter_names(model)
    by_block = tensors_by_block(lora)
    local_keys = [n for b, names in by_block.items() if b not in gal for n in names]
    everything = {n for n, _ in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n}
    first = Setup(model, everything, local_keys=local_keys)
    with first.active():
        train_steps(model, data, [idx] * args.score_steps, first.optimizer, device=args.device, max_grad_norm=CLIP)
    momentum = alg.momentum_update(None, alg.neuron_scores(first.sq_grads), BETA)
    masks = alg.select_top_neurons(momentum, RHO)
    frozen = sorted({module_key(k) for k, m in masks.items() if not bool(m.any())})
    frozen_tensors = {k for k, m in masks.items() if not bool(m.any())}
    trainable = everything - frozen_tensors
    lowest = min((b for b, names in by_block.items() if any(n in trainable for n in names)), default=len(blocks))
    modules = sorted({module_key(n) for n in lora})
    info = {"gal": gal, "layer_scores": [round(float(x), 4) for x in layer_scores],
            "local_tensors": len(local_keys), "frozen_tensors": len(frozen_tensors),
            "frozen_modules": len(frozen), "lora_modules": len(modules),
            "frozen_module_share": len(frozen) / len(modules),
            "lowest_trainable_block": lowest,
            "selected_neuron_share": sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())}
    return Setup(model, trainable, masks=masks, local_keys=local_keys, label="fibec"), info


def depth_setup(model, k: int) -> Setup:
    lora = lora_parameter_names(model)
    from fedml_fibec.models import block_index

    names = {n for n, _ in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n}
    return Setup(model, {n for n in names if ".lora_" not in n or block_index(n) >= k}, label=f"lowest_block={k}")


def cached_setup(model, data, idx, k: int, device) -> Setup:
    """lowest_block=k with the blocks below k replayed from a cache filled once (eval mode) for the batch."""
    s = depth_setup(model, k)
    cache = FrozenPrefixCache(k, [])
    cache.hidden = [None] * len(data)
    cache.fill(model, [idx], lambda rows: model_inputs(data, rows, device))
    s.prefix, s.label = cache, f"cached_prefix={k}"
    return s


def phases(model, data, idx, s: Setup, device, repeats: int) -> dict:
    """Forward / backward / optimizer seconds of one step, the body of train_steps with timers."""
    out = {"forward": [], "backward": [], "optimizer": []}
    with s.active() as sparse:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        for r in range(repeats + 1):
            inputs, y = model_inputs(data, idx, device), data.labels[idx].to(device)
            sync(device)
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(**inputs).logits.float(), y)
            sync(device)
            t1 = time.perf_counter()
            s.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync(device)
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            s.optimizer.step()
            if sparse is not None:
                sparse.after_step()
            sync(device)
            t3 = time.perf_counter()
            if r:  # the first is a warm-up
                out["forward"].append(t1 - t0)
                out["backward"].append(t2 - t1)
                out["optimizer"].append(t3 - t2)
    return {k: statistics.median(v) for k, v in out.items()}


def bench_model(name: str, args) -> None:
    model, tokenizer = lora_model(name, device=args.device, seed=args.seed)
    ids, mask, labels, real_tokens = text_batch(tokenizer, args.batch, args.seq_len, seed=args.seed)
    data = EncodedSet(ids, mask, labels)
    idx = torch.arange(args.batch)
    blocks = transformer_blocks(model)
    L = len(blocks)
    dev_ids, dev_mask = ids.to(args.device), mask.to(args.device)

    fibec, info = fibec_setup(model, data, idx, dev_ids, dev_mask, args)
    everything = {n for n, _ in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n}
    variants = {"dense": Setup(model, everything, label="dense"), "fibec": fibec}
    depths = sorted({0, L // 4, L // 2, (3 * L) // 4, L - 1, L}) if not args.no_sweep else []
    for k in depths:
        variants[f"lowest_block={k}"] = depth_setup(model, k)
    for k in depths:
        if 0 < k < L:
            variants[f"cached_prefix={k}"] = cached_setup(model, data, idx, k, args.device)

    probe = BackwardProbe(blocks)
    times: dict[str, list[float]] = {v: [] for v in variants}
    hit: dict[str, list[int]] = {}
    load_before = loadavg()
    for r in range(args.warmup + args.repeats):
        for label, s in variants.items():
            with s.active() as sparse:
                after = None if sparse is None else sparse.after_step
                probe.reset()
                sync(args.device)
                t0 = time.perf_counter()
                train_steps(model, data, [idx], s.optimizer, device=args.device, max_grad_norm=CLIP, after_step=after,
                            prefix=s.prefix)
                sync(args.device)
                dt = time.perf_counter() - t0
                hit[label] = sorted(probe.hit)
            if r >= args.warmup:
                times[label].append(dt)
    load_after = loadavg()
    probe.close()

    common = {"bench": "local_step", "model": name, "batch": args.batch, "seq_len": args.seq_len,
              "real_tokens_mean": round(real_tokens, 1), "num_blocks": L, **context(args),
              "loadavg_before": load_before, "loadavg_after": load_after}
    lowest_of = {"dense": 0, "fibec": info["lowest_trainable_block"], **{f"lowest_block={k}": k for k in depths},
                 **{f"cached_prefix={k}": k for k in depths}}
    skips = {}
    for label, t in times.items():
        expected = list(range(lowest_of[label], L))
        skips[label] = hit[label] == expected
        rec = {**common, "what": label, **summarize(t), "vs_dense": ratio(statistics.median(t),
                                                                           statistics.median(times["dense"])),
               "blocks_with_backward": hit[label], "lowest_trainable_block": lowest_of[label],
               "autograd_skips_frozen_lower_blocks": skips[label]}
        if label == "fibec":
            rec.update(info)
        emit(rec)
    for label in ("dense", "fibec"):
        emit({**common, "what": "phases", "variant": label,
              **{f"{k}_s": v for k, v in phases(model, data, idx, variants[label], args.device, args.repeats).items()}})
    med = {k: statistics.median(v) for k, v in times.items()}
    emit({**common, "what": "summary", "fibec_vs_dense": ratio(med["fibec"], med["dense"]),
          "fibec_vs_dense_paired": paired_ratio_median(times["fibec"], times["dense"]),
          "autograd_skips_frozen_lower_blocks": all(skips.values()),
          "targets": {"fibec_vs_dense<=0.8": ratio(med["fibec"], med["dense"]) <= 0.8},
          **{k: info[k] for k in ("gal", "frozen_module_share", "lowest_trainable_block", "selected_neuron_share")}})


def main() -> None:
    p = base_parser(__doc__.splitlines()[1])
    p.add_argument("--batch", type=int, default=None, help="samples per step (default 16; --quick 4)")
    p.add_argument("--seq-len", type=int, default=None, help="padded tokens per sample (default 64; --quick 16)")
    p.add_argument("--score-steps", type=int, default=8,
                   help="dense steps of the first participation whose squared gradients score the neurons")
    p.add_argument("--no-sweep", action="store_true", help="only dense and fibec")
    args = p.parse_args()
    setup(args, default_repeats=5)
    args.batch = args.batch or (4 if args.quick else 16)
    args.seq_len = args.seq_len or (16 if args.quick else 64)
    if args.quick:
        args.score_steps = min(args.score_steps, 2)
    for name in args.models:
        bench_model(name, args)


if __name__ == "__main__":
    main()
