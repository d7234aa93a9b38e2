"""Pacing function, curriculum size and minibatch draws (FIBECFED.md sections 1 and 6)."""
import math

import pytest
import torch

from fedml_fibec.algorithm.curriculum import (
    curriculum_batches,
    curriculum_size,
    easiest_first,
    local_batches,
    pacing,
)


def test_pacing_endpoints_and_monotone():
    assert pacing(0, g0=0.2, T_c=10, p=0.5) == pytest.approx(0.2)
    assert pacing(10, g0=0.2, T_c=10, p=0.5) == 1.0
    assert pacing(25, g0=0.2, T_c=10, p=0.5) == 1.0
    values = [pacing(t, g0=0.2, T_c=10, p=0.5) for t in range(0, 16)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert pacing(4, g0=0.2, T_c=10, p=0.5) == pytest.approx(0.2 + 0.8 * math.sqrt(0.4))


def test_pacing_linear_and_disabled():
    for t in range(11):
        assert pacing(t, g0=0.1, T_c=10, p=1.0) == pytest.approx(0.1 + 0.09 * t)
    assert pacing(0, g0=0.3, T_c=0, p=0.5) == 1.0
    assert pacing(3, g0=1.0, T_c=10, p=0.5) == 1.0  # g0 = 1: curriculum off
    with pytest.raises(ValueError):
        pacing(1, g0=1.5, T_c=10, p=0.5)


def test_curriculum_size_min_and_cap():
    assert curriculum_size(0, 100, g0=0.2, T_c=10, p=1.0, min_samples=1) == 20
    assert curriculum_size(0, 100, g0=0.2, T_c=10, p=1.0, min_samples=50) == 50
    assert curriculum_size(0, 30, g0=0.2, T_c=10, p=1.0, min_samples=64) == 30
    assert curriculum_size(20, 100, g0=0.2, T_c=10, p=1.0, min_samples=1) == 100
    assert curriculum_size(0, 10, g0=0.7, T_c=10, p=1.0, min_samples=1) == 7  # 0.7 * 10 is not 8
    assert curriculum_size(0, 7, g0=0.5, T_c=10, p=1.0, min_samples=0) == 4


def test_easiest_first_stable():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 0.5])
    assert easiest_first(scores).tolist() == [4, 1, 3, 2, 0]


def test_curriculum_batches_draw_only_easiest():
    scores = torch.rand(50, generator=torch.Generator().manual_seed(0))
    order = easiest_first(scores)
    easiest = set(order[:12].tolist())
    batches = curriculum_batches(order, 12, batch_size=5, num_steps=9, generator=torch.Generator().manual_seed(1))
    assert len(batches) == 9 and all(b.shape == (5,) for b in batches)
    drawn = torch.cat(batches).tolist()
    assert set(drawn) <= easiest
    assert set(drawn[:12]) == easiest  # first epoch covers the subset exactly once


def test_small_subset_gives_batches_of_subset_size():
    order = torch.arange(10).flip(0)
    batches = curriculum_batches(order, 3, batch_size=8, num_steps=4, generator=torch.Generator().manual_seed(0))
    assert all(sorted(b.tolist()) == [7, 8, 9] for b in batches)


def test_full_curriculum_equals_local_batches():
    scores = torch.rand(23, generator=torch.Generator().manual_seed(5))
    cur = curriculum_batches(easiest_first(scores), 23, batch_size=4, num_steps=13,
                             generator=torch.Generator().manual_seed(7))
    plain = local_batches(23, batch_size=4, num_steps=13, generator=torch.Generator().manual_seed(7))
    # An independent definition of the plain draw: concatenated randperm epochs cut into batches.
    gen = torch.Generator().manual_seed(7)
    stream = torch.cat([torch.randperm(23, generator=gen) for _ in range(3)])[:52]
    assert all(torch.equal(a, b) for a, b in zip(cur, plain)) and len(cur) == len(plain) == 13
    assert torch.equal(torch.stack(plain), stream.view(13, 4))


def test_bad_arguments():
    with pytest.raises(ValueError):
        curriculum_batches(torch.arange(5), 0, batch_size=2, num_steps=1, generator=torch.Generator())
    with pytest.raises(ValueError):
        curriculum_batches(torch.arange(5), 6, batch_size=2, num_steps=1, generator=torch.Generator())
    assert local_batches(5, batch_size=2, num_steps=0, generator=torch.Generator()) == []


def test_stratified_order_keeps_label_shares_and_easiest_within_class():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 30 + [1] * 10)
    # every class-1 sample is easier than every class-0 sample: the unstratified prefix is all class 1
    scores = torch.cat([torch.rand(30) + 1.0, torch.rand(10)])
    plain = easiest_first(scores)
    assert set(labels[plain[:10]].tolist()) == {1}
    order = easiest_first(scores, labels)
    assert sorted(order.tolist()) == list(range(40))
    for n in (4, 8, 20, 40):
        share = labels[order[:n]].float().mean().item()
        assert abs(share - 0.25) <= 1.0 / n + 1e-9
    for c in (0, 1):
        in_class = [i for i in order.tolist() if labels[i] == c]
        assert in_class == sorted(in_class, key=lambda i: scores[i].item())


def test_local_step_count():
    from fedml_fibec.algorithm.curriculum import local_step_count

    assert local_step_count(96, batch_size=16, epochs=None, max_steps=8) == 8  # fixed local work
    assert local_step_count(96, batch_size=16, epochs=1, max_steps=None) == 6
    assert local_step_count(20, batch_size=16, epochs=1, max_steps=None) == 2  # 20 samples: 16 + 4 -> 2 steps
    assert local_step_count(10, batch_size=16, epochs=1, max_steps=None) == 1  # batch shrinks to n_use
    assert local_step_count(96, batch_size=16, epochs=2.5, max_steps=None) == 15
    assert local_step_count(96, batch_size=16, epochs=2, max_steps=8) == 8  # capped
    import pytest
    with pytest.raises(ValueError):
        local_step_count(96, batch_size=16, epochs=None, max_steps=None)
