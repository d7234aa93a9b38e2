"""Neuron scores, top-rho masks and the bit-exact sparse update (FIBECFED.md section 3)."""
import peft
import pytest
import torch
from tiny import tiny_batch, tiny_model, tiny_texts, tiny_tokenizer

from fedml_fibec.algorithm import payload_bytes, weighted_average
from fedml_fibec.algorithm.sparse import (
    SparseUpdate,
    momentum_update,
    neuron_scores,
    select_top_neurons,
    squared_grad_hooks,
)


def test_squared_grad_hooks_accumulate_each_backward_and_neuron_scores():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    v = torch.nn.Parameter(torch.zeros(2))
    acc = {}
    hooks = squared_grad_hooks(acc, {"w": w, "v": v})
    (w * torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.0]])).sum().backward()  # v gets no grad: skipped
    assert set(acc) == {"w"}
    ((w * torch.ones(3, 2)).sum() + (v * torch.tensor([2.0, -3.0])).sum()).backward()
    assert torch.equal(acc["w"], torch.tensor([[2.0, 5.0], [1.0, 2.0], [10.0, 1.0]]))
    assert torch.equal(acc["v"], torch.tensor([4.0, 9.0]))
    for h in hooks:
        h.remove()
    (w.sum() + v.sum()).backward()  # removed: nothing more is added
    assert torch.equal(acc["v"], torch.tensor([4.0, 9.0]))
    scores = neuron_scores(acc)
    assert torch.equal(scores["w"], torch.tensor([7.0, 3.0, 11.0]))
    assert torch.equal(scores["v"], torch.tensor([4.0, 9.0]))


def test_momentum_update():
    prev = {"a": torch.tensor([1.0, 2.0]), "gone": torch.tensor([9.0])}
    new = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([5.0])}
    out = momentum_update(prev, new, 0.9)
    assert set(out) == {"a", "b"}
    assert torch.allclose(out["a"], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4]))
    assert torch.equal(out["b"], new["b"])
    first = momentum_update(None, new, 0.9)
    assert all(torch.equal(first[k], new[k]) for k in new)


def test_select_top_neurons_ranks_across_modules():
    scores = {"a": torch.tensor([0.1, 0.9, 0.5]), "b": torch.tensor([0.8, 0.2])}
    masks = select_top_neurons(scores, 0.4)  # ceil(0.4 * 5) = 2
    assert masks["a"].tolist() == [False, True, False] and masks["b"].tolist() == [True, False]
    masks = select_top_neurons(scores, 0.5)  # ceil(2.5) = 3
    assert masks["a"].tolist() == [False, True, True] and masks["b"].tolist() == [True, False]
    assert all(m.all() for m in select_top_neurons(scores, 1.0).values())
    assert not any(m.any() for m in select_top_neurons(scores, 0.0).values())
    ties = select_top_neurons({"a": torch.ones(2), "b": torch.ones(2)}, 0.5)
    assert ties["a"].tolist() == [True, True] and ties["b"].tolist() == [False, False]
    big = select_top_neurons({"x": torch.rand(40), "y": torch.rand(25)}, 0.25)
    assert sum(int(m.sum()) for m in big.values()) == 17  # ceil(0.25 * 65)
    with pytest.raises(ValueError):
        select_top_neurons(scores, 1.5)


def _lora_bert():
    model = peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                                    lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_sparse_update_keeps_unselected_bit_identical_under_adamw():
    model = _lora_bert()
    model.train()
    texts, labels = tiny_texts(8, seed=1)
    enc = tiny_batch(tiny_tokenizer(), texts, 16)
    labels = torch.tensor(labels)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(**enc).logits, labels).backward()

    # A few dense steps first so AdamW carries momentum into the sparse phase.
    for _ in range(2):
        step()
        opt.step()
    local = {n: p for n, p in model.named_parameters() if "layer.1." in n and "lora_" in n}
    names = sorted(local)
    frozen_name = names[0]
    scores = {n: torch.rand(p.shape[0], generator=torch.Generator().manual_seed(i)) for i, (n, p) in
              enumerate(sorted(local.items()))}
    scores[frozen_name] = torch.full_like(scores[frozen_name], -1.0)  # lowest: nothing selected there
    masks = select_top_neurons(scores, 0.25)
    assert not masks[frozen_name].any() and sum(int(m.any()) for m in masks.values()) >= 1
    before = {n: p.detach().clone() for n, p in local.items()}
    with SparseUpdate(local, masks) as sparse:
        assert not local[frozen_name].requires_grad
        for _ in range(3):
            step()
            assert local[frozen_name].grad is None
            opt.step()
            sparse.after_step()
    assert local[frozen_name].requires_grad
    changed = 0
    for n, p in local.items():
        keep = masks[n]
        assert torch.equal(p[~keep], before[n][~keep]), n
        changed += int((p[keep] != before[n][keep]).any(dim=-1).sum())
    assert changed == sum(int(m.sum()) for m in masks.values())
    # Hooks are gone after close: a dense step moves every row again.
    step()
    assert all(p.grad is not None and (p.grad != 0).any() for p in local.values())
    model.eval()


def test_sparse_update_rejects_mismatched_masks():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="rows"):
        SparseUpdate({"p": p}, {"p": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="missing"):
        SparseUpdate({"p": p}, {})


def test_select_top_neurons_per_module_keeps_each_modules_share():
    scores = {"a": torch.tensor([9.0, 8.0, 7.0, 6.0]), "b": torch.tensor([0.1, 0.3, 0.2, 0.0])}
    joint = select_top_neurons(scores, 0.5)
    assert joint["a"].tolist() == [True] * 4 and not joint["b"].any()  # jointly, the big module wins
    per = select_top_neurons(scores, 0.5, per_module=True)
    assert per["a"].tolist() == [True, True, False, False] and per["b"].tolist() == [False, True, True, False]


@pytest.mark.parametrize("ranking", ["global", "per_module"])
def test_second_reading_trains_only_selected_gal_rows_and_freezes_the_rest(tiny_assets, ranking):
    """sparse_target=gal, two participations of each device in the trainer's own path: in the second,
    every unselected GAL LoRA row comes back bit-identical to what the server sent, and the non-GAL
    LoRA tensors never move from their initial values."""
    from harness import CPU, SCORED_GAL, build_data, build_model, tiny_config

    from fedml_fibec.core.device_round import DeviceRound
    from fedml_fibec.core.server_round import ServerRound
    from fedml_fibec.models import head_parameter_names, trainable_state_dict

    model_dir, csv = tiny_assets
    cfg = tiny_config(model_dir, csv, *SCORED_GAL, "sparse_target=gal", "rho=0.25", f"neuron_ranking={ranking}",
                      "client_num_in_total=2", "client_num_per_round=2", "comm_round=3", "g0=1")
    server_model, tok = build_model(cfg)
    fd = build_data(cfg, tok)
    server = ServerRound(server_model, cfg, fd.test, CPU)
    initial = {k: v.detach().clone() for k, v in trainable_state_dict(build_model(cfg)[0]).items()}
    device_round = DeviceRound(build_model(cfg)[0], cfg)
    states = {0: {}, 1: {}}

    def exchange():
        download = server.download()
        uploads = [device_round.run(download, d, fd.train[d].data, states[d], CPU) for d in (0, 1)]
        server.aggregate(uploads)
        return download, uploads

    exchange()  # scoring: the GAL
    heads = set(head_parameter_names(server_model))
    _, first = exchange()  # first participation: no scores yet, the GAL's LoRA trains densely and gets scored
    assert all(not up.rows for up in first)  # dense: every row travels
    momentum = {d: dict(states[d]["momentum"]) for d in (0, 1)}
    before = {k: v.clone() for k, v in server.global_tensors.items()}
    download, uploads = exchange()  # second participation: sparse
    gal_lora = [k for k in download.tensors if k not in heads]
    assert gal_lora and set(momentum[0]) == set(gal_lora)
    for d, up in zip((0, 1), uploads):
        masks = select_top_neurons(momentum[d], 0.25, per_module=ranking == "per_module")
        full = up.dense_tensors(download.tensors)
        moved = 0
        for k in gal_lora:
            keep = ~masks[k]
            assert torch.equal(full[k][keep], download.tensors[k][keep]), (d, k)
            moved += int((full[k][masks[k]] != download.tensors[k][masks[k]]).any())
            # only the selected rows travel, and the device's own model holds exactly what the server rebuilds
            if not masks[k].all():
                assert up.rows[k].tolist() == masks[k].nonzero().reshape(-1).tolist(), (d, k)
                assert up.tensors[k].shape[0] == int(masks[k].sum())
            assert torch.equal(full[k], dict(device_round.model.named_parameters())[k].detach()) or d == 0
        assert moved > 0  # the selected rows did train
        assert up.nbytes < payload_bytes(full)  # the row-sparse upload is smaller than the dense one
        assert 0 < up.stats["updated_neuron_share"] <= 0.25 + 1e-9 or ranking == "per_module"
        local = states[d]["local"]
        assert local and set(local).isdisjoint(download.tensors)
        assert all(torch.equal(local[k], initial[k]) for k in local)  # the non-GAL LoRA never trained
    # the server's average of the row-sparse uploads is the average of the whole tensors they stand for
    dense = weighted_average([(up.dense_tensors(download.tensors), up.num_samples) for up in uploads])
    assert all(torch.equal(server.global_tensors[k], dense[k].float()) for k in dense)
    assert any(not torch.equal(server.global_tensors[k], before[k]) for k in gal_lora)
