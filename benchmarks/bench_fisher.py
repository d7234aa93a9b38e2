#!/usr/bin/env python
"""Difficulty scoring cost (issue 6, benchmark 1).

Per model, on one batch (default 32 MR snippets padded to 64 tokens, LoRA r=8 on q/v as in the runs):
  embedding_onepass  fedml_fibec.algorithm.embedding_fisher_scores (one batched backward)
  lora_onepass       lora_fisher_scores (one batched backward + per-sample einsum)
  logits_onepass     logit_fisher_scores (closed form from one forward pass, no backward)
  embedding_loop     per_sample_fisher_scores(wrt="embeddings"): one unpadded sample at a time (reference)
  lora_loop          per_sample_fisher_scores(wrt="lora")
  train_fwd_bwd      one plain training forward + cross-entropy + backward over the same batch (LoRA + head
                     gradients, train mode), the cost a scoring pass is compared with
then a `summary` line with the ratios the targets are about, and how far one-pass and loop scores differ.
With --dataset-samples N, the same comparison over N samples scored the way the trainer scores a device's
data (length-sorted batches, each cut to its longest row): dataset_* lines and a `dataset_summary`.

    python benchmarks/bench_fisher.py [--models minilm smollm2] [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import time

from common import base_parser, context, emit, lora_model, loadavg, paired_ratio_median, ratio, setup, \
    summarize, text_batch, time_interleaved

import torch
from torch import nn

from fedml_fibec.algorithm import embedding_fisher_scores, logit_fisher_scores, lora_fisher_scores, \
    per_sample_fisher_scores

TARGETS = {"embedding_speedup_vs_loop_min": 10.0, "embedding_vs_train_max": 1.3, "lora_speedup_vs_loop_min": 5.0}


def train_fwd_bwd(model: nn.Module, ids, mask, labels) -> None:
    model.train()
    logits = model(input_ids=ids, attention_mask=mask).logits
    nn.functional.cross_entropy(logits.float(), labels).backward()
    model.zero_grad(set_to_none=True)


def length_batches(ids, mask, labels, batch: int):
    """The trainer's scoring batches: rows sorted by length, each batch cut to its longest row."""
    lengths = mask.sum(dim=1)
    out = []
    for rows in torch.argsort(lengths.cpu(), stable=True).split(batch):
        t = int(lengths[rows].max())
        out.append((ids[rows, :t], mask[rows, :t], labels[rows]))
    return out


def bench_dataset(name: str, model, tokenizer, args) -> None:
    """Scoring a device's data set as the trainer does vs the loop and a training pass over the same rows."""
    ids, mask, labels, real_tokens = text_batch(tokenizer, args.dataset_samples, args.seq_len, seed=args.seed + 1)
    ids, mask, labels = ids.to(args.device), mask.to(args.device), labels.to(args.device)
    batches = length_batches(ids, mask, labels, args.batch)
    fns = {
        "dataset_embedding_onepass": lambda: [embedding_fisher_scores(model, *b) for b in batches],
        "dataset_lora_onepass": lambda: [lora_fisher_scores(model, *b) for b in batches],
        "dataset_logits_onepass": lambda: [logit_fisher_scores(model, *b) for b in batches],
        "dataset_train_fwd_bwd": lambda: [train_fwd_bwd(model, *b) for b in batches],
        "dataset_embedding_loop": lambda: per_sample_fisher_scores(model, ids, mask, labels, wrt="embeddings"),
        "dataset_lora_loop": lambda: per_sample_fisher_scores(model, ids, mask, labels, wrt="lora"),
    }
    load_before = loadavg()
    times = time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=args.device)
    common = {"bench": "fisher", "model": name, "samples": args.dataset_samples, "batch": args.batch,
              "seq_len": args.seq_len, "real_tokens_mean": round(real_tokens, 1),
              "padded_tokens_mean": round(sum(b[0].numel() for b in batches) / args.dataset_samples, 1),
              **context(args), "loadavg_before": load_before, "loadavg_after": loadavg()}
    for what, t in times.items():
        emit({**common, "what": what, **summarize(t)})
    med = {k: summarize(v)["median_s"] for k, v in times.items()}
    emb, lora, train = med["dataset_embedding_onepass"], med["dataset_lora_onepass"], med["dataset_train_fwd_bwd"]
    emit({**common, "what": "dataset_summary",
          "embedding_speedup_vs_loop": ratio(med["dataset_embedding_loop"], emb),
          "lora_speedup_vs_loop": ratio(med["dataset_lora_loop"], lora),
          "embedding_vs_train": ratio(emb, train), "lora_vs_train": ratio(lora, train),
          "logits_vs_train": ratio(med["dataset_logits_onepass"], train),
          "targets": {"embedding_speedup_vs_loop>=10": ratio(med["dataset_embedding_loop"], emb) >= 10,
                      "embedding_vs_train<=1.3": ratio(emb, train) <= 1.3,
                      "lora_speedup_vs_loop>=5": ratio(med["dataset_lora_loop"], lora) >= 5}})


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-30)).max())


def bench_model(name: str, args) -> None:
    started = time.perf_counter()
    model, tokenizer = lora_model(name, device=args.device, seed=args.seed)
    ids, mask, labels, real_tokens = text_batch(tokenizer, args.batch, args.seq_len, seed=args.seed)
    ids, mask, labels = ids.to(args.device), mask.to(args.device), labels.to(args.device)
    load_s = time.perf_counter() - started

    fns = {
        "embedding_onepass": lambda: embedding_fisher_scores(model, ids, mask, labels),
        "lora_onepass": lambda: lora_fisher_scores(model, ids, mask, labels),
        "logits_onepass": lambda: logit_fisher_scores(model, ids, mask, labels),
        "train_fwd_bwd": lambda: train_fwd_bwd(model, ids, mask, labels),
    }
    if not args.skip_loop:
        fns["embedding_loop"] = lambda: per_sample_fisher_scores(model, ids, mask, labels, wrt="embeddings")
        fns["lora_loop"] = lambda: per_sample_fisher_scores(model, ids, mask, labels, wrt="lora")
    load_before = loadavg()
    times = time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=args.device)
    load_after = loadavg()
    common = {"bench": "fisher", "model": name, "batch": args.batch, "seq_len": args.seq_len,
              "real_tokens_mean": round(real_tokens, 1), **context(args), "loadavg_before": load_before,
              "loadavg_after": load_after}
    for what, t in times.items():
        emit({**common, "what": what, **summarize(t)})

    med = {k: summarize(v)["median_s"] for k, v in times.items()}
    summary = {**common, "what": "summary", "model_load_s": round(load_s, 2),
               "embedding_vs_train": ratio(med["embedding_onepass"], med["train_fwd_bwd"]),
               "embedding_vs_train_paired": paired_ratio_median(times["embedding_onepass"], times["train_fwd_bwd"]),
               "lora_vs_train": ratio(med["lora_onepass"], med["train_fwd_bwd"]),
               "logits_vs_train": ratio(med["logits_onepass"], med["train_fwd_bwd"])}
    if not args.skip_loop:
        summary.update(
            embedding_speedup_vs_loop=ratio(med["embedding_loop"], med["embedding_onepass"]),
            lora_speedup_vs_loop=ratio(med["lora_loop"], med["lora_onepass"]),
            embedding_speedup_paired=paired_ratio_median(times["embedding_loop"], times["embedding_onepass"]),
            lora_speedup_paired=paired_ratio_median(times["lora_loop"], times["lora_onepass"]))
        # The scores themselves: one-pass must agree with the loop (a fast wrong answer is no answer).
        summary["embedding_max_rel_diff"] = max_rel_diff(embedding_fisher_scores(model, ids, mask, labels),
                                                         per_sample_fisher_scores(model, ids, mask, labels))
        summary["lora_max_rel_diff"] = max_rel_diff(lora_fisher_scores(model, ids, mask, labels),
                                                    per_sample_fisher_scores(model, ids, mask, labels, wrt="lora"))
        summary["targets"] = {
            "embedding_speedup_vs_loop>=10": summary["embedding_speedup_vs_loop"] >= 10,
            "embedding_vs_train<=1.3": summary["embedding_vs_train"] <= 1.3,
            "lora_speedup_vs_loop>=5": summary["lora_speedup_vs_loop"] >= 5,
        }
    emit(summary)
    if args.dataset_samples:
        bench_dataset(name, model, tokenizer, args)


def main() -> None:
    p = base_parser(__doc__.splitlines()[1])
    p.add_argument("--batch", type=int, default=None, help="samples per batch (default 32; --quick 8)")
    p.add_argument("--seq-len", type=int, default=None, help="padded tokens per sample (default 64; --quick 16)")
    p.add_argument("--dataset-samples", type=int, default=0,
                   help="also score N samples as the trainer does (length-sorted batches cut to their longest "
                        "row) against the loop and a training pass over the same rows (default off; --quick 12)")
    p.add_argument("--skip-loop", action="store_true", help="leave out the per-sample loop reference")
    args = p.parse_args()
    setup(args, default_repeats=5)
    args.batch = args.batch or (8 if args.quick else 32)
    args.seq_len = args.seq_len or (16 if args.quick else 64)
    if args.quick and not args.dataset_samples:
        args.dataset_samples = 12
    for name in args.models:
        bench_model(name, args)


if __name__ == "__main__":
    main()
