"""The frozen-prefix cache: what it stores, what replaying it computes, and that it changes no result."""
from __future__ import annotations

import pytest
import torch

from fedml_fibec.models import apply_lora, default_target_modules, transformer_blocks
from fedml_fibec.models.prefix_cache import FrozenPrefixCache, prefix_fingerprint, replay_prefix, run_prefix

FAMILIES = ("bert", "roberta", "gpt2", "llama")
TEXTS = ["good film", "the plot was very dull and the music was awful", "superb", "a lovely moving story and"]


def _lora_model(family):
    from tiny import tiny_model

    model = tiny_model(family)
    return apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=default_target_modules(model)).eval()


def _batch(family):
    from tiny import tiny_tokenizer

    enc = tiny_tokenizer()(TEXTS, padding="longest", return_tensors="pt")  # right padding, as the data layer
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if family == "bert":
        inputs["token_type_ids"] = torch.zeros_like(enc["input_ids"])
    return inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_output_is_the_models_own_hidden_state(family):
    """run_prefix stops after block 0 and returns what the full model reports as hidden_states[1]."""
    model, inputs = _lora_model(family), _batch(family)
    hidden, _ = run_prefix(model, 1, inputs)
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True).hidden_states[1]
    real = inputs["attention_mask"].bool()
    assert hidden.shape == reference.shape
    torch.testing.assert_close(hidden[real], reference[real])


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_prefix_gives_the_full_forward_without_running_the_prefix(family):
    """Logits with block 0 replayed from the cache equal the plain forward's, even after block 0's weights
    are made NaN (so it cannot have run), and the blocks get their own forward back afterwards."""
    model, inputs = _lora_model(family), _batch(family)
    with torch.no_grad():
        reference = model(**inputs).logits
    cache = FrozenPrefixCache(1, [])
    cache.hidden = [None] * len(TEXTS)
    rows = torch.arange(len(TEXTS))
    assert cache.fill(model, [rows[:2], rows[2:]], lambda r: {k: v[r][:, :int(inputs["attention_mask"][r].sum(1).max())]
                                                              for k, v in inputs.items()}) == len(TEXTS)
    assert cache.missing() == []
    assert [h.shape[0] for h in cache.hidden] == inputs["attention_mask"].sum(1).tolist()  # trimmed per sample
    for p in transformer_blocks(model)[0].parameters():
        p.data.fill_(float("nan"))
    cache.select(rows, torch.device("cpu"))
    with torch.no_grad(), cache.replaying(model):
        replayed = model(**inputs).logits
    torch.testing.assert_close(replayed, reference)
    assert "forward" not in vars(transformer_blocks(model)[0])  # restored
    with torch.no_grad():
        assert torch.isnan(model(**inputs).logits).any()  # the poisoned block runs again


def test_replay_without_a_selected_batch_fails_loudly():
    model, inputs = _lora_model("bert"), _batch("bert")
    with pytest.raises(RuntimeError, match="no cached batch"):
        with replay_prefix(model, 1, lambda: (_ for _ in ()).throw(RuntimeError("no cached batch selected"))):
            model(**inputs)
    cache = FrozenPrefixCache(1, [])
    with pytest.raises(RuntimeError, match="no cached batch selected"):
        with cache.replaying(model):
            model(**inputs)


def test_a_cache_for_another_prefix_is_stale():
    """A cache is reused only for the same first trained block, the same prefix tensors and data size."""
    hidden = [torch.ones(3, 4), torch.ones(2, 4)]
    fp = prefix_fingerprint({"a": torch.ones(2, 2)})
    state = {"prefix_cache": {"first_trained": 2, "fingerprint": fp, "tuple": False, "hidden": hidden}}
    assert FrozenPrefixCache.from_state(state, 2, fp, 2).missing() == []
    assert FrozenPrefixCache.from_state(state, 1, fp, 2).missing() == [0, 1]
    moved = prefix_fingerprint({"a": torch.tensor([[1.0, 1.0], [1.0, 1.5]])})
    assert moved != fp
    assert FrozenPrefixCache.from_state(state, 2, moved, 2).missing() == [0, 1]
    assert FrozenPrefixCache.from_state(state, 2, fp, 3).missing() == [0, 1, 2]
    assert FrozenPrefixCache.from_state({}, 2, fp, 2).missing() == [0, 1]


@pytest.fixture(scope="module")
def dropout_free_assets(tmp_path_factory):
    """The tiny BERT of the other integration tests with every dropout at 0: train mode = eval mode."""
    import pandas as pd
    from tiny import tiny_model, tiny_texts, tiny_tokenizer

    root = tmp_path_factory.mktemp("no_dropout")
    model = tiny_model("bert")
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    texts, labels = tiny_texts(120, seed=3)
    seconds, _ = tiny_texts(120, seed=4)
    # One file serves both tests: single-text runs read `text`, pair runs also read `text2`.
    pd.DataFrame({"text": texts, "text2": seconds, "label": labels}).to_csv(root / "data.csv", index=False)
    return root / "model", root / "data.csv"


def test_cached_prefix_changes_no_result_and_is_filled_by_the_scoring_pass(dropout_free_assets, tmp_path):
    """FibecFed's default (suffix GAL, second reading, curriculum) over three rounds in which both devices
    take part each time: with the cache the global model and every record equal the run without it
    (dropout off, so the only difference is which code computes block 0), the devices report the
    replayed block, and each device's cache holds its samples' block-0 output."""
    from harness import build_model, run_federation, tiny_config

    model_dir, csv = dropout_free_assets
    common = ("client_num_in_total=2", "client_num_per_round=2", "comm_round=3", "epochs=1", "local_steps=null",
              "gal_shape=suffix", "sparse_target=gal", "g0=0.3")
    plain = run_federation(tiny_config(model_dir, csv, *common, "cache_frozen_prefix=false"), tmp_path / "plain")
    cfg = tiny_config(model_dir, csv, *common, "cache_frozen_prefix=true")
    cached = run_federation(cfg, tmp_path / "cached")

    assert [u.stats["replayed_blocks"] for u in cached.last_uploads] == [1, 1]
    assert [u.stats["replayed_blocks"] for u in plain.last_uploads] == [0, 0]
    for a, b in zip(plain.records, cached.records):
        assert a["samples_seen"] == b["samples_seen"]
        assert a["global_accuracy"] == pytest.approx(b["global_accuracy"], abs=1e-9)
        assert a["global_loss"] == pytest.approx(b["global_loss"], rel=1e-5)
    for k, v in plain.server.global_tensors.items():
        torch.testing.assert_close(cached.server.global_tensors[k], v, rtol=1e-5, atol=1e-6)

    model = build_model(cfg)[0]
    for dev in (0, 1):
        kept = cached.store.load(dev)["prefix_cache"]
        data = cached.data.train[dev].data
        assert kept["first_trained"] == 1 and len(kept["hidden"]) == len(data)
        n = int(data.attention_mask[0].sum())
        hidden, _ = run_prefix(model, 1, {"input_ids": data.input_ids[:1, :n], "attention_mask": data.attention_mask[:1, :n]})
        torch.testing.assert_close(kept["hidden"][0], hidden[0])


def test_pair_task_cache_holds_the_prefix_output_of_the_segmented_inputs(dropout_free_assets, tmp_path):
    """Sentence pairs on BERT: the scoring pass sees the segment ids, so the cache it fills is block 0's
    output for the inputs training sees (second text in segment 1), and the run equals the uncached one."""
    from harness import build_model, run_federation, tiny_config

    model_dir, csv = dropout_free_assets
    common = ("client_num_in_total=2", "client_num_per_round=2", "comm_round=2", "epochs=1", "local_steps=null",
              "gal_shape=suffix", "sparse_target=gal", "g0=0.3", "text_pair_column=text2", "max_seq_length=24")
    plain = run_federation(tiny_config(model_dir, csv, *common, "cache_frozen_prefix=false"), tmp_path / "plain")
    cfg = tiny_config(model_dir, csv, *common, "cache_frozen_prefix=true")
    cached = run_federation(cfg, tmp_path / "cached")
    for a, b in zip(plain.records, cached.records):
        assert a["global_accuracy"] == pytest.approx(b["global_accuracy"], abs=1e-9)
    for k, v in plain.server.global_tensors.items():
        torch.testing.assert_close(cached.server.global_tensors[k], v, rtol=1e-5, atol=1e-6)

    model = build_model(cfg)[0]
    data = cached.data.train[0].data
    assert data.token_type_ids is not None and bool(data.token_type_ids.any())
    # The difficulty scores (round 0, the initial model) are those of the segmented inputs.
    from fedml_fibec.algorithm import score_dataset

    fb = cfg.fibec_args
    score = lambda **kw: score_dataset(model, data.input_ids, data.attention_mask, data.labels, wrt=fb.wrt,
                                       fisher=fb.fisher, normalize=fb.normalize, **kw)
    difficulty = cached.store.load(0)["difficulty"]
    torch.testing.assert_close(difficulty, score(token_type_ids=data.token_type_ids), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(difficulty, score(), rtol=1e-4, atol=1e-6)
    kept = cached.store.load(0)["prefix_cache"]["hidden"]
    for i in range(len(data)):
        n = int(data.attention_mask[i].sum())
        inputs = {"input_ids": data.input_ids[i:i + 1, :n], "attention_mask": data.attention_mask[i:i + 1, :n],
                  "token_type_ids": data.token_type_ids[i:i + 1, :n]}
        torch.testing.assert_close(kept[i], run_prefix(model, 1, inputs)[0][0])
