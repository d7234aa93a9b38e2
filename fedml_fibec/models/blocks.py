"""Map parameter names and modules to transformer blocks (FibecFed's 'layers')."""
from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

# The attribute that holds the block ModuleList, per family:
#   BERT/RoBERTa/ELECTRA: encoder.layer.N   DistilBERT: transformer.layer.N
#   GPT-2: transformer.h.N                   Llama/Mistral/Qwen2/Gemma: model.layers.N
#   T5/ViT-style fallbacks: block.N / blocks.N
# The container name must be a whole dotted component, so e.g. 'attn.c_h.3.' is not read as block 3.
_BLOCK_CONTAINERS = ("layer", "layers", "h", "block", "blocks")
_BLOCK_RE = re.compile(r"(?:^|\.)(?:" + "|".join(_BLOCK_CONTAINERS) + r")\.(\d+)(?:\.|$)")


def block_index(param_name: str) -> int | None:
    """Transformer block index named in `param_name`, or None for the head, embeddings and norms."""
    match = _BLOCK_RE.search(param_name)
    return int(match.group(1)) if match else None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model, looking through a peft wrapper if there is one."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer block modules of `model` in order (works through a PeftModel)."""
    base = unwrap_model(model)
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name.rsplit(".", 1)[-1] in _BLOCK_CONTAINERS:
            # Only a list whose children's parameter names parse back to their position is usable:
            # block_index() and this function must agree on what "block i" is.
            if block_index(f"{name}.0.weight") == 0:
                found.append((name, module))
    # Nested lists (e.g. a 'layers' list inside each block) would also match; the outermost wins.
    outer = [(n, m) for n, m in found if not any(n != o and n.startswith(o + ".") for o, _ in found)]
    if len(outer) != 1:
        from fedml_fibec.errors import ConfigError

        names = [n for n, _ in outer] or "none"
        raise ConfigError(
            f"cannot find exactly one list of transformer blocks in {type(base).__name__} "
            f"(candidates: {names}); FibecFed needs a single stack of blocks"
        )
    return list(outer[0][1])


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks L of `model`."""
    return len(transformer_blocks(model))


def tensors_by_block(names: Iterable[str]) -> dict[int, list[str]]:
    """Group tensor names by block index (ascending); names outside any block are left out."""
    groups: dict[int, list[str]] = {}
    for name in names:
        index = block_index(name)
        if index is not None:
            groups.setdefault(index, []).append(name)
    return dict(sorted(groups.items()))
