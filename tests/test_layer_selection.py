"""Layer sensitivity scores and GAL selection (FIBECFED.md section 2)."""
import math
import re

import peft
import pytest
import torch
from tiny import tiny_batch, tiny_model, tiny_texts, tiny_tokenizer

from fedml_fibec.algorithm.layer_selection import (
    grad_sensitivity_layer_scores,
    perturbation_layer_scores,
    select_gal,
    weighted_mean_scores,
)

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def lora_model(family: str):
    model = peft.get_peft_model(tiny_model(family),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], lora_dropout=0.0))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def blocks_of(model, family):
    inner = model.base_model.model
    return list(inner.bert.encoder.layer if family == "bert" else inner.model.layers)


def batch(n=5, side="right"):
    texts, labels = tiny_texts(n, seed=4)
    enc = tiny_batch(tiny_tokenizer(), texts, 16, side)
    return enc["input_ids"], enc["attention_mask"], torch.tensor(labels)


def test_select_gal_ratio_with_ties():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5])
    assert select_gal(scores, ratio=0.5) == [1, 3]
    assert select_gal(scores, ratio=0.25) == [1]  # tie at 0.5 goes to the lower index
    assert select_gal(scores, ratio=0.3) == [1, 3]  # ceil(1.2) = 2
    assert select_gal(scores, ratio=0.75) == [1, 2, 3]
    assert select_gal(scores, ratio=1.0) == [0, 1, 2, 3]
    assert select_gal(torch.ones(4), ratio=0.5) == [0, 1]
    assert select_gal(torch.ones(10), ratio=0.7) == list(range(7))  # 0.7 * 10 is not 8


def test_select_gal_mass():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5])  # total 1.4
    assert select_gal(scores, mass=0.3) == [1]  # 0.5 >= 0.42
    assert select_gal(scores, mass=0.5) == [1, 3]  # 1.0 >= 0.7
    assert select_gal(scores, mass=0.8) == [1, 2, 3]  # 1.3 >= 1.12
    assert select_gal(scores, mass=0.95) == [0, 1, 2, 3]
    assert select_gal(scores, mass=1.0) == [0, 1, 2, 3]
    assert select_gal(torch.ones(4), mass=0.5) == [0, 1]


def test_select_gal_suffix_takes_the_last_blocks_whatever_the_scores():
    scores = torch.tensor([0.9, 0.5, 0.3, 0.1])  # the top-scoring blocks are the first ones
    assert select_gal(scores, ratio=0.5, shape="suffix") == [2, 3]
    assert select_gal(scores, ratio=0.3, shape="suffix") == [2, 3]  # ceil(1.2) = 2, as for scored
    assert select_gal(scores, ratio=1.0, shape="suffix") == [0, 1, 2, 3]
    assert select_gal(torch.ones(6), ratio=0.5, shape="suffix") == [3, 4, 5]
    # mass: the shortest run of last blocks holding the share (total 1.8)
    assert select_gal(scores, mass=0.05, shape="suffix") == [3]  # 0.1 >= 0.09
    assert select_gal(scores, mass=0.4, shape="suffix") == [1, 2, 3]  # 0.4 < 0.72 <= 0.9
    assert select_gal(scores, mass=0.6, shape="suffix") == [0, 1, 2, 3]  # 0.9 < 1.08
    with pytest.raises(ValueError, match="shape must be 'scored' or 'suffix'"):
        select_gal(scores, ratio=0.5, shape="top")


@pytest.mark.parametrize("kwargs", [{}, {"ratio": 0.5, "mass": 0.5}, {"ratio": 0.0}, {"ratio": 1.5},
                                    {"mass": 0.0}, {"mass": 2.0}])
def test_select_gal_bad_args(kwargs):
    with pytest.raises(ValueError):
        select_gal(torch.ones(3), **kwargs)


def test_select_gal_rejects_nan_and_negative_mass():
    with pytest.raises(ValueError, match="finite"):
        select_gal(torch.tensor([1.0, float("nan")]), ratio=0.5)
    with pytest.raises(ValueError, match="non-negative"):
        select_gal(torch.tensor([1.0, -1.0]), mass=0.5)


def test_weighted_mean_scores():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 1.0])
    got = weighted_mean_scores([(a, 1.0), (b, 3.0)])
    assert torch.allclose(got, torch.tensor([10.0 / 4, 2.0 / 4, 6.0 / 4]))
    with pytest.raises(ValueError):
        weighted_mean_scores([])
    with pytest.raises(ValueError):
        weighted_mean_scores([(a, 0.0)])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_perturbation_zero_sigma_zero_and_positive_otherwise(family):
    model = lora_model(family)
    ids, mask, _ = batch(side="left" if family == "llama" else "right")
    blocks = blocks_of(model, family)
    zero = perturbation_layer_scores(model, ids, mask, blocks=blocks, sigma=0.0)
    assert zero.shape == (len(blocks),) and torch.equal(zero, torch.zeros(len(blocks)))
    pos = perturbation_layer_scores(model, ids, mask, blocks=blocks, sigma=0.1,
                                    generator=torch.Generator().manual_seed(0))
    again = perturbation_layer_scores(model, ids, mask, blocks=blocks, sigma=0.1,
                                      generator=torch.Generator().manual_seed(0))
    assert (pos > 0).all() and torch.equal(pos, again)


def pair_segments(mask):
    """Segment ids of a sentence pair: the second half of each sample's real tokens is segment 1."""
    positions = torch.arange(mask.shape[1]).unsqueeze(0)
    return ((positions >= mask.sum(1, keepdim=True) // 2) & mask.bool()).long()


def with_distinct_segments(model):
    """Segment 1's type embedding far from segment 0's, so scoring without the segment ids shows."""
    with torch.no_grad():
        model.base_model.model.bert.embeddings.token_type_embeddings.weight[1].normal_(0, 1.0)
    return model


@pytest.mark.parametrize("pairs", [False, True])
def test_perturbation_matches_hand_computation(pairs):
    # Reference via inputs_embeds and output_hidden_states, rebuilding the same noise.
    model = with_distinct_segments(lora_model("bert")) if pairs else lora_model("bert")
    ids, mask, _ = batch()
    segments = {"token_type_ids": pair_segments(mask)} if pairs else {}
    sigma = 0.05
    got = perturbation_layer_scores(model, ids, mask, blocks=blocks_of(model, "bert"), sigma=sigma,
                                    generator=torch.Generator().manual_seed(3), **segments)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        noise = torch.randn(emb.shape, generator=torch.Generator().manual_seed(3))
        noise = noise * sigma * emb.norm(dim=-1, keepdim=True) / math.sqrt(emb.shape[-1]) * mask[..., None]
        clean = model(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True, **segments).hidden_states[1:]
        noisy = model(inputs_embeds=emb + noise, attention_mask=mask, output_hidden_states=True,
                      **segments).hidden_states[1:]
    expected = []
    for h, h2 in zip(clean, noisy):
        per_sample = [(h2[b][mask[b].bool()] - h[b][mask[b].bool()]).norm() / h[b][mask[b].bool()].norm()
                      for b in range(len(ids))]
        expected.append(torch.stack(per_sample).mean())
    assert torch.allclose(got, torch.stack(expected), rtol=1e-5, atol=0)
    if pairs:  # the segment ids reached the model: without them the scores differ
        plain = perturbation_layer_scores(model, ids, mask, blocks=blocks_of(model, "bert"), sigma=sigma,
                                          generator=torch.Generator().manual_seed(3))
        assert not torch.allclose(got, plain, rtol=1e-4, atol=0)


@pytest.mark.parametrize("pairs", [False, True])
def test_grad_sensitivity_matches_hand_computation(pairs):
    model = with_distinct_segments(lora_model("bert")) if pairs else lora_model("bert")
    ids, mask, labels = batch()
    segments = {"token_type_ids": pair_segments(mask)} if pairs else {}

    def block_of(name):
        m = re.search(r"\.layer\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    got = grad_sensitivity_layer_scores(model, ids, mask, labels, block_of=block_of, num_blocks=2, **segments)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask, **segments).logits, labels)
    loss.backward()
    sums, counts = [0.0, 0.0], [0, 0]
    for name, p in model.named_parameters():
        if "lora_" in name:
            b = block_of(name)
            sums[b] += (p * p.grad).abs().sum().item()
            counts[b] += p.numel()
    model.zero_grad(set_to_none=True)
    expected = torch.tensor([s / c for s, c in zip(sums, counts)])
    assert (got > 0).all() and torch.allclose(got, expected, rtol=1e-5, atol=0)
    if pairs:
        plain = grad_sensitivity_layer_scores(model, ids, mask, labels, block_of=block_of, num_blocks=2)
        assert not torch.allclose(got, plain, rtol=1e-4, atol=0)
