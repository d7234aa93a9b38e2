"""One-pass Fisher difficulty scores against the per-sample loop (FIBECFED.md section 1)."""
import copy

import peft
import pytest
import torch
from tiny import tiny_batch, tiny_model, tiny_texts, tiny_tokenizer

from fedml_fibec.algorithm.fisher import (
    embedding_fisher_scores,
    logit_fisher_scores,
    lora_fisher_scores,
    per_sample_fisher_scores,
    score_dataset,
)

TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
ONE_PASS = {"embeddings": embedding_fisher_scores, "lora": lora_fisher_scores, "logits": logit_fisher_scores}
RTOL = 1e-5
_cache = {}


def lora_model(family: str, num_labels: int = 2):
    """Tiny peft-LoRA classifier; lora_B made non-zero so lora_A gets gradients too."""
    key = (family, num_labels)
    if key not in _cache:
        model = peft.get_peft_model(tiny_model(family, num_labels),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], lora_dropout=0.0))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        _cache[key] = model
    return _cache[key]


def batch(n: int = 6, side: str = "right", max_length: int = 16, num_labels: int = 2):
    texts, labels = tiny_texts(n, seed=3, num_labels=num_labels)
    enc = tiny_batch(tiny_tokenizer(), texts, max_length, side)
    return enc["input_ids"], enc["attention_mask"], torch.tensor(labels)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs().clamp(min=1e-30)).max().item()


CASES = [(f, w) for f in ("bert", "llama") for w in ("embeddings", "lora", "logits")] + [
    ("gpt2", "lora"), ("roberta", "lora"), ("gpt2", "logits")]


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("family,wrt", CASES)
def test_one_pass_matches_loop_right_padding(family, wrt, fisher):
    model = lora_model(family)
    ids, mask, labels = batch()
    assert (mask.sum(1) < mask.shape[1]).all()  # every sample really is padded
    got = ONE_PASS[wrt](model, ids, mask, labels, fisher=fisher)
    ref = per_sample_fisher_scores(model, ids, mask, labels, wrt=wrt, fisher=fisher)
    assert got.dtype == torch.float32 and got.shape == (ids.shape[0],)
    assert (ref > 0).all()
    assert rel_err(got, ref) < RTOL


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("wrt", ["embeddings", "lora", "logits"])
def test_llama_left_and_right_padding_match_unpadded(wrt, fisher):
    # Llama uses rotary (relative) positions and pools the last real token, so padding on either
    # side must leave every sample's score as it is unpadded.
    model = lora_model("llama")
    ids_r, mask_r, labels = batch(side="right")
    ids_l, mask_l, _ = batch(side="left")
    ref = per_sample_fisher_scores(model, ids_r, mask_r, labels, wrt=wrt, fisher=fisher)
    assert rel_err(ONE_PASS[wrt](model, ids_r, mask_r, labels, fisher=fisher), ref) < RTOL
    assert rel_err(ONE_PASS[wrt](model, ids_l, mask_l, labels, fisher=fisher), ref) < RTOL


@pytest.mark.parametrize("wrt", ["embeddings", "lora", "logits"])
def test_bert_left_padding_samples_do_not_interact(wrt):
    # BERT pools position 0 and has absolute positions, so left padding changes the model's own
    # output; what must still hold is that a batch scores each sample as it would alone.
    model = lora_model("bert")
    ids, mask, labels = batch(side="left")
    got = ONE_PASS[wrt](model, ids, mask, labels)
    alone = torch.cat([ONE_PASS[wrt](model, ids[i:i + 1], mask[i:i + 1], labels[i:i + 1]) for i in range(len(ids))])
    assert rel_err(got, alone) < RTOL


@pytest.mark.parametrize("wrt", ["embeddings", "lora", "logits"])
def test_true_fisher_is_expectation_over_classes(wrt):
    model = lora_model("bert", num_labels=3)
    ids, mask, labels = batch(num_labels=3)
    per_class = torch.stack([per_sample_fisher_scores(model, ids, mask, torch.full_like(labels, c), wrt=wrt)
                             for c in range(3)], dim=1)
    with torch.no_grad():
        probs = torch.stack([model(input_ids=ids[i:i + 1][mask[i:i + 1].bool()].view(1, -1)).logits[0].softmax(-1)
                             for i in range(len(ids))])
    expected = (probs * per_class).sum(1)
    assert rel_err(ONE_PASS[wrt](model, ids, mask, labels, fisher="true"), expected) < RTOL
    assert rel_err(per_sample_fisher_scores(model, ids, mask, labels, wrt=wrt, fisher="true"), expected) < RTOL


@pytest.mark.parametrize("wrt", ["embeddings", "lora", "logits"])
def test_token_normalisation_divides_by_real_tokens(wrt):
    model = lora_model("bert")
    ids, mask, labels = batch()
    plain = ONE_PASS[wrt](model, ids, mask, labels)
    per_token = ONE_PASS[wrt](model, ids, mask, labels, normalize="tokens")
    assert rel_err(per_token, plain / mask.sum(1)) < 1e-6
    ref = per_sample_fisher_scores(model, ids, mask, labels, wrt=wrt, normalize="tokens")
    assert rel_err(per_token, ref) < RTOL


@pytest.mark.parametrize("wrt", ["embeddings", "lora", "logits"])
def test_score_dataset_batching_equals_one_batch(wrt):
    model = lora_model("llama")
    ids, mask, labels = batch(n=7)
    whole = ONE_PASS[wrt](model, ids, mask, labels, fisher="true")
    assert rel_err(score_dataset(model, ids, mask, labels, batch_size=3, wrt=wrt, fisher="true"), whole) < RTOL


@pytest.mark.parametrize("wrt", ["embeddings", "lora", "logits"])
def test_sentence_pairs_are_scored_with_their_segment_ids(wrt):
    # A pair task's second text is segment 1 on BERT: the one-pass scores with the segment ids must
    # match the per-sample loop given them, and differ from scoring every token as segment 0.
    model = copy.deepcopy(lora_model("bert"))  # a copy: the cached model is shared by other tests
    with torch.no_grad():  # the random type embedding of segment 1 must differ from segment 0's
        model.base_model.model.bert.embeddings.token_type_embeddings.weight[1].normal_(0, 1.0)
    ids, mask, labels = batch()
    lengths = mask.sum(1, keepdim=True)
    segments = ((torch.arange(ids.shape[1]).unsqueeze(0) >= lengths // 2) & mask.bool()).long()
    assert segments.any()
    got = ONE_PASS[wrt](model, ids, mask, labels, token_type_ids=segments)
    ref = per_sample_fisher_scores(model, ids, mask, labels, wrt=wrt, token_type_ids=segments)
    assert rel_err(got, ref) < RTOL
    batched = score_dataset(model, ids, mask, labels, batch_size=4, wrt=wrt, token_type_ids=segments)
    assert rel_err(batched, ref) < RTOL
    assert rel_err(ONE_PASS[wrt](model, ids, mask, labels), ref) > 10 * RTOL


def test_training_grads_and_modes_untouched():
    model = lora_model("bert")
    model.train()
    ids, mask, labels = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        p.grad = None if i % 2 else torch.full_like(p, 0.5)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    for wrt, fn in ONE_PASS.items():
        for fisher in ("empirical", "true"):
            fn(model, ids, mask, labels, fisher=fisher)
        per_sample_fisher_scores(model, ids[:2], mask[:2], labels[:2], wrt=wrt)
    for p, old in zip(params, before):
        assert (p.grad is None) if old is None else torch.equal(p.grad, old)
    assert all(m.training for m in model.modules())
    model.eval()
    for p in params:
        p.grad = None


def test_bad_option_rejected():
    model = lora_model("bert")
    ids, mask, labels = batch(n=2)
    with pytest.raises(ValueError, match="fisher"):
        embedding_fisher_scores(model, ids, mask, labels, fisher="exact")
    with pytest.raises(ValueError, match="wrt"):
        score_dataset(model, ids, mask, labels, wrt="head")
