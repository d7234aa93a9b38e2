"""Hugging Face sequence classifiers with peft LoRA, and the tensor -> transformer-block mapping."""
from fedml_fibec.models.blocks import block_index, num_blocks, tensors_by_block, transformer_blocks, unwrap_model
from fedml_fibec.models.builder import BUILTIN_MODELS, load_model_and_tokenizer, resolve_model_path
from fedml_fibec.models.lora import (
    apply_lora,
    default_target_modules,
    head_parameter_names,
    load_trainable_state,
    lora_parameter_names,
    trainable_state_dict,
)

__all__ = [
    "BUILTIN_MODELS",
    "apply_lora",
    "block_index",
    "default_target_modules",
    "head_parameter_names",
    "load_model_and_tokenizer",
    "load_trainable_state",
    "lora_parameter_names",
    "num_blocks",
    "resolve_model_path",
    "tensors_by_block",
    "trainable_state_dict",
    "transformer_blocks",
    "unwrap_model",
]
