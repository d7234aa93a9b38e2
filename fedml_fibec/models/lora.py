"""LoRA (peft) on a sequence classifier: target modules, trainable head, trainable-state exchange."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import peft
import torch
from torch import nn

from fedml_fibec.models.blocks import block_index, unwrap_model

# Attention query/value projections per model_type (the paper's LoRA placement).
_TARGETS: dict[str, list[str]] = {}
for _types, _modules in (
    (("bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "megatron-bert", "ernie"),
     ["query", "value"]),
    (("distilbert",), ["q_lin", "v_lin"]),
    (("deberta", "deberta-v2"), ["query_proj", "value_proj"]),
    # GPT-2 fuses q, k and v into one Conv1D; LoRA on it is the usual placement.
    (("gpt2",), ["c_attn"]),
    (("gpt_neox",), ["query_key_value"]),
    # Phi-3 fuses q, k and v as well.
    (("phi3",), ["qkv_proj"]),
    (("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "gemma3_text",
      "phi", "opt", "olmo", "olmo2", "granite", "smollm3", "starcoder2", "stablelm"),
     ["q_proj", "v_proj"]),
):
    for _type in _types:
        _TARGETS[_type] = _modules

# Where transformers puts the sequence-classification head, by class convention.
_HEAD_NAMES = ("classifier", "score")

# Names peft gives to LoRA tensors (lora_A/lora_B, lora_embedding_A/B, DoRA's lora_magnitude_vector).
_LORA_MARK = ".lora_"
# peft keeps the trainable copy of a module in modules_to_save under this component.
_HEAD_MARK = ".modules_to_save."


def default_target_modules(model: nn.Module) -> list[str]:
    """LoRA target module names for the model's architecture (attention query/value)."""
    model_type = getattr(unwrap_model(model).config, "model_type", None)
    if model_type in _TARGETS:
        return list(_TARGETS[model_type])
    # peft's own table covers more architectures; apply_lora still checks the result lies in blocks.
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_targets

    if model_type in peft_targets:
        return list(peft_targets[model_type])
    from fedml_fibec.errors import ConfigError

    raise ConfigError(
        f"no default LoRA target modules for model_type {model_type!r}; set `lora_target_modules` "
        f"to the attention projection module names of this architecture (e.g. ['q_proj', 'v_proj'])"
    )


def _head_name(model: nn.Module) -> str:
    """Attribute name of the classification head ('classifier' or 'score')."""
    for name in _HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    from fedml_fibec.errors import ConfigError

    raise ConfigError(
        f"{type(model).__name__} has no classification head named {' or '.join(_HEAD_NAMES)}; "
        f"load the model with AutoModelForSequenceClassification"
    )


def apply_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str] | None = None,
) -> peft.PeftModel:
    """Wrap `model` with LoRA on `target_modules`; LoRA and the head are trainable, all else frozen."""
    from fedml_fibec.errors import ConfigError

    if int(r) != r or r < 1:
        raise ConfigError(f"`lora_r` must be a positive integer, got {r!r}")
    if alpha <= 0:
        raise ConfigError(f"`lora_alpha` must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"`lora_dropout` must be in [0, 1), got {dropout!r}")
    targets = list(target_modules) if target_modules else default_target_modules(model)
    head = _head_name(model)
    model_type = getattr(model.config, "model_type", None)
    config = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS,
        r=int(r),
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        # Only our head: peft's SEQ_CLS default would wrap any module called 'classifier' or 'score'.
        modules_to_save=[head],
        # GPT-2's Conv1D stores weights transposed; saying so avoids peft's warning-and-fix.
        fan_in_fan_out=model_type == "gpt2",
        bias="none",
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"`lora_target_modules` {targets} cannot be applied: {exc}") from exc
    outside = [n for n in lora_parameter_names(wrapped) if block_index(n) is None]
    if outside:
        raise ConfigError(
            f"`lora_target_modules` {targets} put LoRA tensors outside the transformer blocks "
            f"({outside[:4]}{' ...' if len(outside) > 4 else ''}); FibecFed assigns every LoRA tensor to a block"
        )
    return wrapped


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of all LoRA tensors, in model order (whatever their current requires_grad)."""
    return [n for n, _ in model.named_parameters() if _LORA_MARK in n]


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable classification-head tensors (peft's modules_to_save copy)."""
    return [n for n, _ in model.named_parameters() if _HEAD_MARK in n]


def _trainable_parameters(model: nn.Module) -> OrderedDict[str, nn.Parameter]:
    """LoRA + head parameters by name, chosen by name so a temporarily frozen module still counts."""
    # The sparse local update switches requires_grad off for whole LoRA modules; selecting by
    # requires_grad would then silently drop them from the exchanged/stored state.
    return OrderedDict((n, p) for n, p in model.named_parameters() if _LORA_MARK in n or _HEAD_MARK in n)


def trainable_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Detached copies of all LoRA and head tensors, keyed by their stable parameter names."""
    # Copies, not views: the caller may keep the dict while training goes on in place.
    return OrderedDict((n, p.detach().clone()) for n, p in _trainable_parameters(model).items())


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy `state` into the model's LoRA/head tensors in place; strict also demands every key."""
    from fedml_fibec.errors import ConfigError

    params = _trainable_parameters(model)
    # Unknown keys are always an error, even when not strict: a name that matches nothing means the
    # sender built a different model, and dropping it silently would hide that.
    unknown = [k for k in state if k not in params]
    missing = [k for k in params if k not in state] if strict else []
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown keys {unknown}")
        if missing:
            parts.append(f"missing keys {missing}")
        raise ConfigError(f"trainable state does not match the model: {'; '.join(parts)}")
    bad_shape = [f"{k}: {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in state.items()
                 if tuple(v.shape) != tuple(params[k].shape)]
    if bad_shape:
        raise ConfigError(f"trainable state has wrong shapes (given vs model): {bad_shape}")
    with torch.no_grad():
        for key, value in state.items():
            # copy_ keeps the Parameter object (optimizers and hooks hold it) and its requires_grad.
            params[key].copy_(value)
