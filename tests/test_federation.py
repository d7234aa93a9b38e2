"""The device round and the server round of our engine driven in one process (no FedML, no MPI)."""
import dataclasses

import torch

from fedml_fibec.algorithm import payload_bytes
from fedml_fibec.methods import METHODS
from fedml_fibec.models import block_index
from harness import FIRST_READING, SCORED_GAL, run_federation, tiny_config


def globals_of(federation):
    return {k: v.clone() for k, v in federation.server.global_tensors.items()}


def test_fibecfed_reduces_to_fedavg_lora(tiny_assets, tmp_path):
    """FIBECFED.md section 6: g0 = 1, gal_ratio = 1, rho = 1 give FedAvg-LoRA's global model."""
    model_dir, csv = tiny_assets
    fedavg = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FedAvg"), tmp_path / "a")
    fibec = run_federation(
        tiny_config(model_dir, csv, "federated_optimizer=FibecFed", "g0=1", "gal_ratio=1", "rho=1"), tmp_path / "b")
    a, b = globals_of(fedavg), globals_of(fibec)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert all(r["curriculum_share"] == 1.0 for r in fibec.records)
    # and training moved the model: the reduction is not two untouched copies
    init = run_federation(tiny_config(model_dir, csv, "comm_round=1", "local_steps=1"), tmp_path / "c").server
    assert any(not torch.equal(a[k], init.global_tensors[k]) for k in a)


def test_default_fibecfed_differs_from_fedavg(tiny_assets, tmp_path):
    model_dir, csv = tiny_assets
    fedavg = globals_of(run_federation(tiny_config(model_dir, csv, "federated_optimizer=FedAvg"), tmp_path / "a"))
    fibec = globals_of(run_federation(tiny_config(model_dir, csv), tmp_path / "b"))
    assert any(not torch.allclose(fedavg[k], fibec[k]) for k in fedavg)


def test_rounds_record_the_devices_cpu_seconds_beside_their_wall_seconds(tiny_assets, tmp_path):
    """Each round's record holds the mean CPU seconds of the devices' scoring and training: positive, and
    no more than the wall seconds of the same work (a thread's CPU time cannot outrun the clock)."""
    model_dir, csv = tiny_assets
    records = run_federation(tiny_config(model_dir, csv, "g0=0.5"), tmp_path / "a").records
    for r in records:
        assert 0 < r["train_cpu_seconds"] <= r["train_seconds"] + 1e-3
        assert 0 <= r["scoring_cpu_seconds"] <= r["scoring_seconds"] + 1e-3
    assert any(r["scoring_cpu_seconds"] > 0 for r in records)  # the curriculum scored its samples


def test_bytes_follow_the_gal_share(tiny_assets, tmp_path):
    model_dir, csv = tiny_assets
    fedavg = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FedAvg"), tmp_path / "a")
    fibec = run_federation(tiny_config(model_dir, csv, *FIRST_READING, "gal_ratio=0.5"), tmp_path / "b")
    server = fibec.server
    assert len(server.gal) == 1 and all(r["gal"] == server.gal for r in fibec.records)
    keys = list(server.global_tensors)
    full = payload_bytes({k: server.global_tensors[k] for k in keys})
    shared_keys = METHODS["FibecFed"].shared_keys(keys, server.gal, block_index)
    shared = payload_bytes({k: server.global_tensors[k] for k in shared_keys})
    assert shared_keys == server.shared_keys()
    per_round = 2  # devices per round
    for r_avg, r_fib in zip(fedavg.records[1:], fibec.records[1:]):
        assert r_avg["bytes_up"] == per_round * full
        assert r_fib["bytes_up"] == per_round * shared
        assert r_fib["bytes_down"] == per_round * shared
    assert shared < 0.75 * full


def test_device_state_follows_the_device_not_the_process(tiny_assets, tmp_path):
    """Device i served by process A in one round and process B in another continues its own state."""
    model_dir, csv = tiny_assets
    cfg = tiny_config(model_dir, csv, *FIRST_READING, "client_num_in_total=3", "comm_round=4", "rho=0.5")
    same = run_federation(cfg, tmp_path / "same", assign=lambda exchange, slot: slot)
    swapped = run_federation(cfg, tmp_path / "swap", assign=lambda exchange, slot: (slot + exchange) % 2)
    a, b = globals_of(same), globals_of(swapped)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    states = [swapped.store.load(d) for d in range(3)]
    assert sum(s.get("participations", 0) for s in states) == 4 * 2
    for s in states:
        if s.get("participations", 0) > 1:
            assert "difficulty" in s and "momentum" in s and s["local"]
            # a device-local tensor kept by the device differs from the global copy
            assert any(not torch.equal(v, same.server.global_tensors[k]) for k, v in s["local"].items())


def test_payload_with_wrong_keys_is_rejected_and_counted(tiny_assets, tmp_path):
    model_dir, csv = tiny_assets
    cfg = tiny_config(model_dir, csv, "comm_round=1")
    federation = run_federation(cfg, tmp_path / "ok")
    server = federation.server
    good = federation.last_uploads[0]
    bad = dataclasses.replace(good, tensors=dict(good.tensors), device_id=99)
    bad.tensors.pop(next(iter(bad.tensors)))
    nan = dataclasses.replace(good, tensors={k: v.clone() for k, v in good.tensors.items()}, device_id=98)
    nan.tensors[next(iter(nan.tensors))][...] = float("nan")
    before = globals_of(federation)
    record = server.aggregate([good, bad, nan])
    assert record["rejected_payloads"] == 2 and record["devices"] == [good.device_id]
    for k, v in good.tensors.items():
        torch.testing.assert_close(server.global_tensors[k], v.float())
    assert before.keys() == server.global_tensors.keys()


def test_lora_fl_baselines_share_the_right_tensors(tiny_assets, tmp_path):
    model_dir, csv = tiny_assets
    ffa = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FFA-LoRA"), tmp_path / "a")
    up = ffa.last_uploads[0].tensors
    assert up and not any(".lora_A." in k for k in up)
    init = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FFA-LoRA", "comm_round=1",
                                      "local_steps=1"), tmp_path / "i").server
    for k, v in ffa.server.global_tensors.items():
        if ".lora_A." in k:
            assert torch.equal(v, init.global_tensors[k])  # A never trained
    sa = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FedSA-LoRA"), tmp_path / "b")
    up = sa.last_uploads[0].tensors
    assert any(".lora_A." in k for k in up) and not any(".lora_B." in k for k in up)


def test_validation_accuracy_is_the_global_model_on_the_held_out_set(tiny_assets, tmp_path):
    """With a validation split the server also scores the global model on it; the test score is unchanged."""
    from fedml_fibec.core.local import evaluate
    from fedml_fibec.models import load_trainable_state

    model_dir, csv = tiny_assets
    fed = run_federation(tiny_config(model_dir, csv, "validation_fraction=0.25", "frequency_of_the_test=2"),
                         tmp_path / "v")
    assert [r["val_accuracy"] is not None for r in fed.records] == [True, False, True]  # rounds 0, 2 (last)
    model = fed.server.model
    load_trainable_state(model, fed.server.global_tensors)
    acc, loss = evaluate(model, fed.data.validation, batch_size=32, device=torch.device("cpu"))
    assert (fed.records[-1]["val_accuracy"], fed.records[-1]["val_loss"]) == (acc, loss)
    test_acc, _ = evaluate(model, fed.data.test, batch_size=32, device=torch.device("cpu"))
    assert fed.records[-1]["global_accuracy"] == test_acc
    plain = run_federation(tiny_config(model_dir, csv), tmp_path / "p")
    assert "val_accuracy" not in plain.records[-1] and plain.data.validation is None


def test_a_tuning_run_gives_the_full_runs_last_validation_accuracies_without_the_test_set(tiny_assets, tmp_path):
    """eval_test_set=false, eval_only_last=3 (compare.TUNING_RUN_OVERRIDES): the validation set only, at the last
    three evaluation rounds, and there the same accuracies, losses and global tensors as the run that evaluates
    everything (evaluation draws no random numbers and changes no weight)."""
    from fedml_fibec.compare import TUNING_RUN_OVERRIDES

    model_dir, csv = tiny_assets
    common = ("validation_fraction=0.25", "comm_round=5", "personal_eval_fraction=0.2")
    full = run_federation(tiny_config(model_dir, csv, *common), tmp_path / "full")
    lean = run_federation(tiny_config(model_dir, csv, *common, *TUNING_RUN_OVERRIDES), tmp_path / "lean")
    assert all(r["global_accuracy"] is None and r["global_loss"] is None for r in lean.records)
    assert [r["val_accuracy"] is not None for r in lean.records] == [False, False, True, True, True]
    assert all(r["global_accuracy"] is not None for r in full.records)
    for f, g in zip(full.records[2:], lean.records[2:]):
        assert (f["val_accuracy"], f["val_loss"]) == (g["val_accuracy"], g["val_loss"])
        assert f["train_loss"] == g["train_loss"] and f["personal_accuracy"] == g["personal_accuracy"]
    for k, v in full.server.global_tensors.items():
        assert torch.equal(v, lean.server.global_tensors[k]), k


def test_epoch_based_local_work_follows_the_curriculum_share(tiny_assets, tmp_path):
    """epochs=1: each device makes ceil(n_use / batch) steps over the n_use samples of its share."""
    import math

    model_dir, csv = tiny_assets
    fed = run_federation(tiny_config(model_dir, csv, "epochs=1", "local_steps=null", "g0=0.25", "T_c=10",
                                     "comm_round=2"),
                         tmp_path / "f")
    dense = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FedAvg", "epochs=1", "local_steps=null",
                                       "comm_round=2"), tmp_path / "d")
    b = 8  # tiny_config's batch_size
    for up, ref in zip(fed.last_uploads, dense.last_uploads):
        assert up.device_id == ref.device_id
        n_total, n_use = ref.num_samples, up.num_samples
        assert n_use < n_total and up.stats["curriculum_share"] == n_use / n_total
        assert up.stats["local_steps"] == math.ceil(n_use / min(b, n_use))
        assert up.stats["samples_seen"] == up.stats["local_steps"] * min(b, n_use)  # one pass, whole batches
        assert ref.stats["local_steps"] == math.ceil(n_total / b)  # FedAvg-LoRA: a full pass
    share = sum(u.num_samples for u in fed.last_uploads) / sum(u.num_samples for u in dense.last_uploads)
    seen = sum(u.stats["samples_seen"] for u in fed.last_uploads) / sum(u.stats["samples_seen"]
                                                                         for u in dense.last_uploads)
    assert abs(seen - share) < 0.15  # work scales with the share (rounding to whole batches aside)
    capped = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FedAvg", "epochs=1", "local_steps=2",
                                        "comm_round=1"), tmp_path / "c")
    assert all(u.stats["local_steps"] == 2 for u in capped.last_uploads)  # local_steps caps epochs


def test_reduction_to_fedavg_lora_holds_with_epoch_based_work(tiny_assets, tmp_path):
    model_dir, csv = tiny_assets
    work = ("epochs=1", "local_steps=null")
    fedavg = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FedAvg", *work), tmp_path / "a")
    fibec = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FibecFed", "g0=1", "gal_ratio=1",
                                       "rho=1", *work), tmp_path / "b")
    a, b = globals_of(fedavg), globals_of(fibec)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_personalised_accuracy_is_the_device_model_on_its_own_held_out_samples(tiny_assets, tmp_path):
    """FedAvg-LoRA shares every tensor, so the upload is the device's whole trained model: evaluated on
    that device's held-out samples it gives the personal accuracy the device reported."""
    from fedml_fibec.core.local import evaluate
    from fedml_fibec.models import load_trainable_state

    model_dir, csv = tiny_assets
    fed = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FedAvg", "personal_eval_fraction=0.25",
                                     "comm_round=1"), tmp_path / "p")
    model = fed.server.model
    for up in fed.last_uploads:
        d = fed.data.train[up.device_id]
        assert d.heldout is not None and len(d.heldout) >= 1
        load_trainable_state(model, {**fed.server.global_tensors, **{k: v.float() for k, v in up.tensors.items()}})
        acc, _ = evaluate(model, d.heldout, batch_size=32, device=torch.device("cpu"))
        assert up.stats["personal_accuracy"] == acc
    record = fed.records[-1]
    assert record["personal_accuracy"] == sum(u.stats["personal_accuracy"] for u in fed.last_uploads) / len(
        fed.last_uploads)
    off = run_federation(tiny_config(model_dir, csv, "federated_optimizer=FedAvg", "comm_round=1"), tmp_path / "o")
    assert off.records[-1]["personal_accuracy"] is None and all(d.heldout is None for d in off.data.train)


def test_gal_chosen_after_warm_up_rounds_from_the_trained_model(tiny_assets, tmp_path):
    """gal_warmup_rounds=2: no scoring exchange; rounds 0-1 share every block, round 1's uploads carry
    layer scores of the trained model, and from round 2 only the chosen GAL travels."""
    from fedml_fibec.core.server_round import exchanges_of
    from fedml_fibec.errors import ConfigError

    model_dir, csv = tiny_assets
    cfg = tiny_config(model_dir, csv, *SCORED_GAL, "gal_warmup_rounds=2", "comm_round=4", "gal_ratio=0.5")
    assert exchanges_of(cfg) == 4  # the training rounds only
    fed = run_federation(cfg, tmp_path / "w")
    every = list(range(fed.server.num_blocks))
    gals = [r["gal"] for r in fed.records]
    assert gals[0] == gals[1] == every and "gal_next" in fed.records[1] and "gal_next" not in fed.records[0]
    assert gals[2] == gals[3] == fed.records[1]["gal_next"] and len(gals[2]) < len(every)
    assert fed.records[2]["bytes_up"] < fed.records[1]["bytes_up"]
    plain = tiny_config(model_dir, csv, *SCORED_GAL, "comm_round=4")
    assert exchanges_of(plain) == 5  # the scoring exchange before round 0
    import pytest
    with pytest.raises(ConfigError, match="gal_warmup_rounds = 4: expected fewer than comm_round"):
        tiny_config(model_dir, csv, "gal_warmup_rounds=4", "comm_round=4")


def test_fixed_suffix_gal_has_no_scoring_exchange_and_leaves_the_blocks_below_untouched(tiny_assets, tmp_path):
    """gal_shape=suffix with gal_ratio: the GAL is the last blocks from round 0 without any layer scores;
    with sparse_target=gal the LoRA below it never moves, on the server or on any device."""
    from fedml_fibec.core.server_round import exchanges_of
    from fedml_fibec.models import trainable_state_dict
    from harness import build_model

    model_dir, csv = tiny_assets
    cfg = tiny_config(model_dir, csv, "gal_shape=suffix", "sparse_target=gal", "gal_ratio=0.5", "comm_round=3")
    assert exchanges_of(cfg) == 3  # training rounds only: nothing to score
    fed = run_federation(cfg, tmp_path / "s")
    last = fed.server.num_blocks - 1
    assert fed.server.layer_scores is None and all(r["gal"] == [last] for r in fed.records)
    init = {k: v.detach().float() for k, v in trainable_state_dict(build_model(cfg)[0]).items()}
    below = [k for k in init if block_index(k) is not None and block_index(k) < last]
    above = [k for k in init if block_index(k) == last and "lora_B" in k]
    assert below and above
    for k in below:
        assert torch.equal(fed.server.global_tensors[k], init[k]), k
    assert all(not torch.equal(fed.server.global_tensors[k], init[k]) for k in above)  # the GAL trained
    states = [fed.store.load(d) for d in range(cfg.train_args.client_num_in_total)]
    for s in states:
        for k, v in s.get("local", {}).items():
            assert torch.equal(v.float(), init[k]), k
    # With gal_mass the suffix's length depends on the scores: the scoring exchange stays.
    by_mass = tiny_config(model_dir, csv, "gal_shape=suffix", "gal_ratio=null", "gal_mass=0.5", "comm_round=3")
    assert exchanges_of(by_mass) == 4


def test_a_device_first_served_at_full_share_is_not_scored(tiny_assets, tmp_path):
    """From round T_c on every sample is in use, so the difficulty order cannot change the draw: a device
    first served then spends nothing on scoring and keeps no difficulty scores."""
    model_dir, csv = tiny_assets
    fed = run_federation(tiny_config(model_dir, csv, "g0=0.25", "T_c=1", "comm_round=3"), tmp_path / "f")
    first: dict[int, int] = {}
    for r in fed.records:
        for d in r["devices"]:
            first.setdefault(d, r["round"])
    assert any(rnd == 0 for rnd in first.values()) and any(rnd > 0 for rnd in first.values())
    for d, rnd in first.items():
        assert ("difficulty" in fed.store.load(d)) == (rnd == 0), (d, rnd)
    assert fed.records[0]["curriculum_share"] < 1 and all(r["curriculum_share"] == 1 for r in fed.records[1:])
