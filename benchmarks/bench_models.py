#!/usr/bin/env python
"""Memory and time per round on CPU for the models the paper's readers name: minilm, roberta-base,
roberta-large, gpt2 and meta-llama/Llama-3.2-1B, each with LoRA as a run applies it.

The hub is not needed: every model is built from its published configuration dimensions (`ARCHITECTURES`)
with random weights (AutoModelForSequenceClassification.from_config). Time and memory depend on the
architecture, not on the weights, so the lines say `"weights": "random (architecture only)"`; `minilm`
is built the same way from all-MiniLM-L6-v2's BERT dimensions (its parameter count equals the built-in
asset's, 22,713,986). LoRA is `fedml_fibec.models.apply_lora` with the family's default targets, so
the targets measured are the ones a run uses (reported per model, with the trainable parameter count).

Per model, at the run defaults (LoRA r=8, alpha 16, dropout 0; AdamW lr 2e-3, clipping 1.0; batch 16,
max_seq_length 64; random token ids, lengths uniform in 16..64, right-padded with the pad id, labels 0/1):
  step_s        one `core.local.train_steps` optimizer step on a batch of 16 (median of `--repeats`
                after `--warmup`; the steps cycle through the device's 6 batches)
  round_s       a device's local round of FedAvg-LoRA at the embedded default's size, one epoch over 96
                samples (MR gives each of 100 devices about 85-96): step_s x 6, not timed as a whole
  eval_s        the server's evaluation of an MR-sized test set (1066 samples, eval batch 64) with
                `core.local.evaluate` (eval mode, no_grad, length-sorted batches trimmed to their longest
                row): `--eval-batches` of the 17 batches, spread from shortest to longest, each timed
                once and scaled to all 17 by padded token positions
  peak_rss_mb_* the process's peak resident set (ru_maxrss) after imports, after building the model with
                LoRA, after the training steps and after the evaluation; ru_maxrss is per process and
                never falls, so each model runs in its own subprocess (this script with `--one-model`)
  params, weights_mb  the base model's parameter count and its fp32 bytes (MB = 10^6 bytes)
Each model prints one JSON line with the context (threads, load average before/after, torch version);
a last line with `"table": true` summarises. One torch thread by default, like a client rank. `--quick`
builds the same five families with tiny dimensions (same classes and LoRA targets; for the tests).

    python benchmarks/bench_models.py [--models gpt2 roberta-base] [--threads 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import base_parser, context, emit, loadavg, setup, summarize, time_interleaved

import torch

# The model code (transformers, peft, fedml_fibec) is imported inside the functions that a child runs:
# the driver only starts children, and stays small while they measure.

WEIGHTS = "random (architecture only)"

# Published configuration dimensions (model_type, config kwargs), by hub name.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "minilm": ("bert", dict(  # sentence-transformers/all-MiniLM-L6-v2, the built-in default
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)),
    "roberta-base": ("roberta", dict(  # RobertaConfig defaults with roberta-base's vocabulary
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "roberta-large": ("roberta", dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "gpt2": ("gpt2", dict(  # GPT2Config defaults; no pad token, so pad = eos as the loader sets it
        n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)),
    "meta-llama/Llama-3.2-1B": ("llama", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        pad_token_id=128001)),  # no pad token: pad = eos (<|end_of_text|>)
}

# --quick: each family shrunk to a few thousand parameters (same classes, same LoRA targets).
_TINY_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=256, max_position_embeddings=130)
TINY_DIMS: dict[str, dict] = {
    "bert": _TINY_ENCODER,
    "roberta": _TINY_ENCODER,
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
                 bos_token_id=255, eos_token_id=255, pad_token_id=255),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  intermediate_size=64, vocab_size=256, max_position_embeddings=128,
                  rope_parameters={**ARCHITECTURES["meta-llama/Llama-3.2-1B"][1]["rope_parameters"],
                                   "original_max_position_embeddings": 64},
                  bos_token_id=1, eos_token_id=2, pad_token_id=2),
}

# Run defaults (config/fedavg_lora_mr_minilm.yaml) and the embedded default's sizes.
LORA_R, LORA_ALPHA, LR, CLIP = 8, 16, 2e-3, 1.0
# A slow model gets fewer repeats unless --repeats / --eval-batches are given.
SLOW_REPEATS = {"meta-llama/Llama-3.2-1B": (2, 2)}


# one model, in its own process ----------------------------------------------------------------------

def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1)


def build_config(name: str, quick: bool):
    """The architecture's config with a 2-label head; --quick shrinks the dimensions only."""
    from transformers import AutoConfig

    model_type, dims = ARCHITECTURES[name]
    kwargs = {**dims, **(TINY_DIMS[model_type] if quick else {})}
    return AutoConfig.for_model(model_type, num_labels=2, **kwargs)


def dims_of(config) -> dict:
    """The dimensions that set the cost, under their common names (GPT-2 maps its own)."""
    hidden = config.hidden_size
    return {"hidden": hidden, "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "intermediate": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
            or 4 * hidden, "vocab": config.vocab_size}


def lora_targets(model) -> list[str]:
    """The module names LoRA was put on, read from the wrapped tensors (what apply_lora really did)."""
    from fedml_fibec.models import lora_parameter_names

    return sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_parameter_names(model)})


def random_set(n: int, seq_len: int, min_len: int, config, generator: torch.Generator):
    """n random samples: ids clear of the low special ids and of pad, lengths uniform in min_len..seq_len,
    right-padded with the pad id (BERT/RoBERTa positions and GPT-2/Llama pooling read it)."""
    from fedml_fibec.data import EncodedSet

    pad, vocab = config.pad_token_id, config.vocab_size
    low = min(1000, vocab // 4)
    lengths = torch.randint(min_len, seq_len + 1, (n,), generator=generator)
    mask = torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)
    ids = torch.randint(low, vocab, (n, seq_len), generator=generator)
    ids[ids == pad] = low
    ids = torch.where(mask, ids, torch.full_like(ids, pad))
    labels = torch.randint(0, 2, (n,), generator=generator)
    return EncodedSet(ids, mask.long(), labels)


def time_round(model, args, g: torch.Generator) -> dict:
    """Median seconds of one local step, cycling through a device's shuffled batches; round = x steps."""
    from fedml_fibec.core.local import make_optimizer, train_steps

    data = random_set(args.samples, args.seq_len, args.min_len, model.config, g)
    batches = list(torch.randperm(args.samples, generator=g).split(args.batch_size))
    optimizer = make_optimizer(model, "adamw", LR, 0.0)  # one per round, as the device trainer does
    turn = itertools.cycle(batches)

    def step():
        train_steps(model, data, [next(turn)], optimizer, device=args.device, max_grad_norm=CLIP)

    times = time_interleaved({"step": step}, repeats=args.repeats, warmup=args.warmup, device=args.device)["step"]
    stats = summarize(times)
    return {"step": stats, "step_s": stats["median_s"], "steps_per_round": len(batches),
            "round_s": stats["median_s"] * len(batches), "round_timing": "median step x steps_per_round",
            "train_real_tokens_mean": round(float(data.attention_mask.sum(1).float().mean()), 1)}


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over 0..n-1, both ends included."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def time_server_eval(model, args, g: torch.Generator) -> dict:
    """Seconds of `evaluate` over the whole test set, estimated from a few of its length-sorted batches."""
    from fedml_fibec.core.local import evaluate, length_sorted_batches

    data = random_set(args.eval_samples, args.seq_len, args.min_len, model.config, g)
    batches = length_sorted_batches(data.attention_mask, args.eval_batch_size)
    positions = [len(rows) * int(data.attention_mask[rows].sum(1).max()) for rows in batches]
    picked = spread(len(batches), args.eval_batches)
    fns = {str(i): (lambda rows=batches[i]: evaluate(model, data.subset(rows), batch_size=args.eval_batch_size,
                                                      device=torch.device(args.device))) for i in picked}
    times = time_interleaved(fns, repeats=1, warmup=0, device=args.device)  # the training steps warmed it
    seconds = sum(times[str(i)][0] for i in picked)
    per_position = seconds / sum(positions[i] for i in picked)
    return {"eval_s": per_position * sum(positions), "eval_batches": len(batches), "eval_batches_timed": picked,
            "eval_batch_s": [round(times[str(i)][0], 4) for i in picked],
            "eval_batch_widths": [positions[i] // len(batches[i]) for i in picked],
            "eval_timing": "timed batches scaled to all by padded token positions"}


def measure(name: str, args) -> dict:
    """Build `name` with LoRA, time a local round and the server's evaluation, with peak RSS after each."""
    from transformers import AutoModelForSequenceClassification

    from fedml_fibec.models import apply_lora, lora_parameter_names

    rss = {"imports": peak_rss_mb()}
    load_before = loadavg()
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    config = build_config(name, args.quick)
    model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    model = apply_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=0.0).to(args.device)
    build_s = time.perf_counter() - start
    rss["build"] = peak_rss_mb()
    train = time_round(model, args, g)
    rss["train"] = peak_rss_mb()
    server = time_server_eval(model, args, g)
    rss["eval"] = peak_rss_mb()
    record = {
        "bench": "models", "model": name, "weights": WEIGHTS, "model_type": config.model_type,
        "architecture": type(model.get_base_model()).__name__, "dims": dims_of(config),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "params": params, "weights_mb": round(params * 4 / 1e6, 1),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_targets": lora_targets(model), "lora_tensors": len(lora_parameter_names(model)),
        "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lr": LR, "max_grad_norm": CLIP,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "samples_per_device": args.samples,
        "eval_samples": args.eval_samples, "eval_batch_size": args.eval_batch_size, "build_s": round(build_s, 2),
        **train, **server, **{f"peak_rss_mb_after_{k}": v for k, v in rss.items()},
        **context(args), "loadavg_before": load_before, "loadavg_after": loadavg(),
    }
    if torch.device(args.device).type == "cuda":
        record["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 1e6, 1)
    return record


# the driver: one subprocess per model ----------------------------------------------------------------

SIZE_FLAGS = ("batch_size", "seq_len", "min_len", "samples", "eval_samples", "eval_batch_size")


def child_command(name: str, args) -> list[str]:
    """This script for one model, with every setting resolved (slow models: fewer repeats)."""
    repeats, eval_batches = args.repeats, args.eval_batches
    if name in SLOW_REPEATS and not args.quick:
        repeats = args.repeats_given or SLOW_REPEATS[name][0]
        eval_batches = args.eval_batches_given or SLOW_REPEATS[name][1]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-model", name, "--threads", str(args.threads),
           "--repeats", str(repeats), "--warmup", str(args.warmup), "--eval-batches", str(eval_batches),
           "--device", args.device, "--seed", str(args.seed)]
    for flag in SIZE_FLAGS:
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return cmd + (["--quick"] if args.quick else [])


def run_child(name: str, args) -> dict:
    """The child's JSON line; its stderr (library warnings) passes through to ours."""
    proc = subprocess.run(child_command(name, args), stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"bench": "models", "model": name, "error": f"subprocess exited {proc.returncode}"}
    return json.loads(lines[-1])


TABLE_KEYS = ("model", "params", "trainable_params", "lora_targets", "weights_mb", "peak_rss_mb_after_build",
              "peak_rss_mb_after_train", "step_s", "round_s", "eval_s", "loadavg_before", "loadavg_after")


def table(records: list[dict], args) -> dict:
    rows = [{k: r.get(k) for k in TABLE_KEYS} for r in records if "error" not in r]
    return {"bench": "models", "table": True, "weights": WEIGHTS, "rows": rows,
            "failed": [r["model"] for r in records if "error" in r], **context(args)}


def main() -> int:
    p = base_parser("Memory and time per round on CPU, per model by hub name (random weights, LoRA as a run "
                    "applies it)", default_models=tuple(ARCHITECTURES), quick_models=tuple(ARCHITECTURES))
    p.add_argument("--one-model", default=None, help=argparse.SUPPRESS)  # internal: this model, this process
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 16; --quick 4)")
    p.add_argument("--seq-len", type=int, default=None, help="max_seq_length (default 64; --quick 16)")
    p.add_argument("--min-len", type=int, default=None, help="shortest random sample (default 16; --quick 4)")
    p.add_argument("--samples", type=int, default=None, help="samples per device (default 96; --quick 8)")
    p.add_argument("--eval-samples", type=int, default=None, help="server test set (default 1066; --quick 20)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="eval batch (default 64; --quick 8)")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="test batches timed, spread from shortest to longest (default 3; --quick 2)")
    args = p.parse_args()
    args.repeats_given, args.eval_batches_given = args.repeats, args.eval_batches
    if args.models is None:
        args.models = list(ARCHITECTURES)
    unknown = [m for m in args.models if m not in ARCHITECTURES]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {', '.join(ARCHITECTURES)}")
    setup(args, default_repeats=3)
    defaults = dict(batch_size=(4, 16), seq_len=(16, 64), min_len=(4, 16), samples=(8, 96), eval_samples=(20, 1066),
                    eval_batch_size=(8, 64), eval_batches=(2, 3))
    for key, (quick, real) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else real)
    if args.one_model is not None:
        emit(measure(args.one_model, args))
        return 0
    records = [emit(run_child(name, args)) for name in args.models]
    emit(table(records, args))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
