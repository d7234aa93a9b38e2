"""Tests of fedml_fibec.models on tiny random models: LoRA placement, blocks, state exchange, loading."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

import tiny
from fedml_fibec.errors import ConfigError
from fedml_fibec.models import (
    apply_lora,
    block_index,
    default_target_modules,
    head_parameter_names,
    load_model_and_tokenizer,
    load_trainable_state,
    lora_parameter_names,
    num_blocks,
    resolve_model_path,
    tensors_by_block,
    trainable_state_dict,
    transformer_blocks,
)

FAMILIES = ["bert", "roberta", "gpt2", "llama"]
EXPECTED_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "gpt2": ["c_attn"],
                    "llama": ["q_proj", "v_proj"]}
TEXTS = ["good film but dull plot", "awful", "the music is very lovely and the story moving"]


def lora_model(family: str, seed: int = 0, lora_seed: int = 1) -> nn.Module:
    """Tiny base model (fixed by `seed`) wrapped with LoRA whose init is fixed by `lora_seed`."""
    base = tiny.tiny_model(family, seed=seed)
    torch.manual_seed(lora_seed)
    return apply_lora(base, r=4, alpha=8, dropout=0.1).eval()


def logits(model: nn.Module, batch) -> torch.Tensor:
    """Eval-mode logits for a tokenized batch."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets(family: str) -> None:
    assert default_target_modules(tiny.tiny_model(family)) == EXPECTED_TARGETS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_only_lora_and_head_trainable(family: str) -> None:
    model = lora_model(family)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora, head = lora_parameter_names(model), head_parameter_names(model)
    # Two blocks x (query, value) x (A, B), except GPT-2's single fused c_attn.
    assert len(lora) == (4 if family == "gpt2" else 8)
    assert head and all(".modules_to_save." in n for n in head)
    assert trainable == set(lora) | set(head)
    assert list(trainable_state_dict(model)) == [n for n, _ in model.named_parameters() if n in trainable]


@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_map_to_blocks(family: str) -> None:
    model = lora_model(family)
    layers = model.config.num_hidden_layers
    assert all(block_index(n) is not None and 0 <= block_index(n) < layers for n in lora_parameter_names(model))
    assert all(block_index(n) is None for n in head_parameter_names(model))
    groups = tensors_by_block(lora_parameter_names(model) + head_parameter_names(model))
    assert list(groups) == list(range(layers))
    assert sum(map(len, groups.values())) == len(lora_parameter_names(model))
    blocks = transformer_blocks(model)
    assert len(blocks) == layers == num_blocks(model) == num_blocks(tiny.tiny_model(family))
    # Block i of transformer_blocks holds exactly the LoRA tensors that block_index maps to i.
    for i, block in enumerate(blocks):
        inside = {id(p) for p in block.parameters()}
        params = dict(model.named_parameters())
        assert all(id(params[n]) in inside for n in groups[i])


def test_block_index_names() -> None:
    assert block_index("base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.default.weight") == 3
    assert block_index("transformer.h.11.attn.c_attn.weight") == 11
    assert block_index("h.0.mlp.c_fc.weight") == 0
    assert block_index("model.layers.29.self_attn.q_proj.lora_B.default.weight") == 29
    assert block_index("distilbert.transformer.layer.5.attention.q_lin.weight") == 5
    for name in ("base_model.model.score.modules_to_save.default.weight", "bert.embeddings.word_embeddings.weight",
                 "transformer.wpe.weight", "model.norm.weight", "classifier.dense.weight", "bert.pooler.dense.weight"):
        assert block_index(name) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_state_round_trip_reproduces_logits(family: str) -> None:
    source = lora_model(family, lora_seed=1)
    torch.manual_seed(2)
    with torch.no_grad():  # lora_B starts at zero; make every trainable tensor matter
        for name in lora_parameter_names(source) + head_parameter_names(source):
            dict(source.named_parameters())[name].add_(0.1 * torch.randn_like(dict(source.named_parameters())[name]))
    state = trainable_state_dict(source)
    target = lora_model(family, lora_seed=3)
    batch = tiny.tiny_batch(tiny.tiny_tokenizer(), TEXTS)
    assert not torch.equal(logits(source, batch), logits(target, batch))
    before = dict(target.named_parameters())
    load_trainable_state(target, state)
    assert torch.equal(logits(source, batch), logits(target, batch))
    after = dict(target.named_parameters())
    assert all(after[n] is before[n] and after[n].requires_grad for n in state)
    # The returned state is a copy: training on after the export must not change it.
    with torch.no_grad():
        next(iter(after.values())).add_(1.0)
    assert torch.equal(next(iter(trainable_state_dict(source).values())), next(iter(state.values())))


def test_state_names_survive_frozen_modules() -> None:
    model = lora_model("bert")
    names = list(trainable_state_dict(model))
    for name in lora_parameter_names(model)[:2]:
        dict(model.named_parameters())[name].requires_grad_(False)  # as the sparse update does
    assert list(trainable_state_dict(model)) == names


def test_strict_load_errors_name_keys() -> None:
    model = lora_model("llama")
    state = trainable_state_dict(model)
    missing = next(iter(state))
    partial = {k: v for k, v in state.items() if k != missing}
    with pytest.raises(ConfigError, match="missing keys.*" + missing.replace(".", r"\.")):
        load_trainable_state(model, partial)
    load_trainable_state(model, partial, strict=False)  # a subset (e.g. only the GAL) is fine
    with pytest.raises(ConfigError, match="unknown keys.*no.such.tensor"):
        load_trainable_state(model, {**state, "no.such.tensor": torch.zeros(1)})
    with pytest.raises(ConfigError, match="unknown keys"):
        load_trainable_state(model, {"no.such.tensor": torch.zeros(1)}, strict=False)
    with pytest.raises(ConfigError, match="wrong shapes"):
        load_trainable_state(model, {missing: torch.zeros(1)}, strict=False)


def test_unknown_model_type_error() -> None:
    fake = nn.Module()
    fake.config = SimpleNamespace(model_type="no-such-arch")
    with pytest.raises(ConfigError, match="no-such-arch.*lora_target_modules"):
        default_target_modules(fake)


def test_target_outside_blocks_rejected() -> None:
    with pytest.raises(ConfigError, match="outside the transformer blocks"):
        apply_lora(tiny.tiny_model("bert"), r=2, alpha=4, dropout=0.0, target_modules=["dense"])  # pooler.dense
    with pytest.raises(ConfigError, match="lora_target_modules"):
        apply_lora(tiny.tiny_model("bert"), r=2, alpha=4, dropout=0.0, target_modules=["no_such_module"])
    with pytest.raises(ConfigError, match="lora_r"):
        apply_lora(tiny.tiny_model("bert"), r=0, alpha=4, dropout=0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_from_local_dir_matches(family: str, tmp_path: Path) -> None:
    path = tiny.tiny_model_dir(tmp_path / family, family)
    assert resolve_model_path(str(path)) == path
    model, tokenizer = load_model_and_tokenizer(str(path), num_labels=2)
    batch = tiny.tiny_batch(tokenizer, TEXTS)
    assert torch.equal(logits(model.eval(), batch), logits(tiny.tiny_model(family), batch))
    assert model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pad_token_fallback(family: str, tmp_path: Path) -> None:
    path = tiny.tiny_model_dir(tmp_path / family, family)
    for stale in path.glob("*token*"):
        stale.unlink()
    raw = Tokenizer(models.WordLevel(vocab=dict(tiny.VOCAB), unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[SEP]").save_pretrained(path)
    model, tokenizer = load_model_and_tokenizer(str(path), num_labels=2)
    eos = tiny.VOCAB["[SEP]"]
    assert tokenizer.pad_token_id == eos == model.config.pad_token_id
    # The decoder classifier must pool the last real token: padded rows equal unpadded ones.
    model.eval()
    padded = tiny.tiny_batch(tokenizer, TEXTS)
    for row, text in enumerate(TEXTS):
        alone = tokenizer([text], return_tensors="pt")
        torch.testing.assert_close(logits(model, padded)[row], logits(model, alone)[0])


def test_hub_id_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # Offline mode makes the hub lookup fail at once instead of retrying for ~50 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("no-such-org/no-such-model") == "no-such-org/no-such-model"
    with pytest.raises(ConfigError, match="`model`.*no hub is reachable"):
        load_model_and_tokenizer("no-such-org/no-such-model", num_labels=2)


def test_smollm2_conversion_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedml_fibec.assets

    done = tmp_path / "smollm2-hf"
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / "fibec_converted.json").write_text(json.dumps({"dtype": "bfloat16"}))

    def no_fetch(*args, **kwargs):
        raise AssertionError("a finished conversion must not fetch the asset again")

    monkeypatch.setattr(fedml_fibec.assets, "asset_path", no_fetch)
    assert resolve_model_path("smollm2", tmp_path) == done
