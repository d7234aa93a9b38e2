"""Shared helpers of the benchmark scripts: threads, timing (warm-up, repeats, median/min/max), JSON lines,
models and batches.

Every script prints one JSON object per line (and nothing else on stdout). Each measurement line holds
`median_s`, `min_s`, `max_s` and `repeats` of one timed callable, plus the context that makes it
comparable: torch threads, device, torch version and the 1-minute load average before and after (a
load far above the thread count means other processes shared the cores: repeat the measurement).
Timings of several variants are interleaved round-robin (A B C A B C ...), so a burst of load from
another process hits every variant alike instead of one of them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

QUICK_MODELS = ("tiny-bert", "tiny-llama")
REAL_MODELS = ("minilm", "smollm2")


def base_parser(description: str, *, default_models: tuple[str, ...] = REAL_MODELS,
                quick_models: tuple[str, ...] = QUICK_MODELS) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny random models, few repeats: checks that the script runs (tests), measures nothing")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"models to measure (default {' '.join(default_models)}; --quick: {' '.join(quick_models)})")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args: argparse.Namespace, default_repeats: int) -> None:
    """Threads, seed and defaults that depend on --quick."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.models is None:
        args.models = list(QUICK_MODELS if args.quick else REAL_MODELS)
    if args.repeats is None:
        args.repeats = 2 if args.quick else default_repeats
    if args.quick:
        args.warmup = min(args.warmup, 1)


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall-clock timers measure it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int,
                     device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds of each callable, `warmup` untimed rounds then `repeats` timed rounds, round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def context(args: argparse.Namespace) -> dict:
    return {"threads": torch.get_num_threads(), "device": str(args.device), "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "quick": bool(args.quick)}


def emit(record: dict) -> dict:
    """Print one JSON line (flushed) and return the record."""
    print(json.dumps(record, default=_jsonable), flush=True)
    return record


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (torch.device, torch.dtype, Path)):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def paired_ratio_median(num: list[float], den: list[float]) -> float:
    """Median of per-repeat ratios (interleaved repeats: each pair saw about the same load)."""
    return statistics.median(a / b for a, b in zip(num, den))


# models and batches ------------------------------------------------------------------------------

TINY_VOCAB = 256


def _tiny_model(name: str):
    from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig

    common = dict(vocab_size=TINY_VOCAB, num_labels=2, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if name == "tiny-bert":
        config = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=128, **common)
    elif name == "tiny-llama":
        config = LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=128, **common)
    else:
        raise ValueError(f"unknown tiny model {name!r}")
    return AutoModelForSequenceClassification.from_config(config), None


def lora_model(name: str, *, device: str = "cpu", seed: int = 0, r: int = 8, alpha: float = 16):
    """A LoRA-wrapped sequence classifier (built-in name or tiny-*) and its tokenizer (None for tiny)."""
    from fedml_fibec.models import apply_lora, load_model_and_tokenizer

    torch.manual_seed(seed)
    if name in QUICK_MODELS:
        model, tokenizer = _tiny_model(name)
    else:
        model, tokenizer = load_model_and_tokenizer(name, 2)
    model = apply_lora(model, r=r, alpha=alpha, dropout=0.0)
    return model.to(device), tokenizer


def text_batch(tokenizer, n: int, seq_len: int, *, seed: int = 0):
    """n samples padded (right) to seq_len: MR snippets with a real tokenizer, random ids for tiny models.

    Returns (input_ids, attention_mask, labels, mean real tokens per sample).
    """
    g = torch.Generator().manual_seed(seed)
    if tokenizer is None:
        lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=g)
        ids = torch.randint(4, TINY_VOCAB, (n, seq_len), generator=g)
        mask = (torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids = ids * mask  # pad id 0
        labels = torch.randint(0, 2, (n,), generator=g)
    else:
        from fedml_fibec.data import load_builtin

        table, _ = load_builtin("mr")
        pick = torch.randperm(len(table), generator=g)[:n].tolist()
        tokenizer.padding_side = "right"
        enc = tokenizer([table.texts[i] for i in pick], padding="max_length", truncation=True,
                        max_length=seq_len, return_tensors="pt")
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        labels = torch.tensor([table.labels[i] for i in pick], dtype=torch.long)
    return ids, mask, labels, float(mask.sum(dim=1).float().mean())
