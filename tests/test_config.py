"""The config schema: every bad key, type, value or combination stops the run with a message naming it."""
import dataclasses
import json

import pytest
import yaml

from fedml_fibec.config import SECTIONS, load_config, describe_keys
from fedml_fibec.errors import ConfigError
from fedml_fibec.world import check_world


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_are_valid_and_main_job_shaped():
    cfg = load_config()
    assert cfg.train_args.federated_optimizer == "FibecFed"
    assert cfg.train_args.client_num_per_round == 10 and cfg.worker_num == 10
    assert cfg.data_args.partition_method == "dirichlet" and cfg.data_args.partition_alpha == 1.0


def test_set_flat_and_sectioned_keys_parse_yaml_values():
    cfg = load_config(None, ["comm_round=2", "fibec_args.g0=1", "learning_rate=5e-3", "lora_target_modules=[query, value]",
                             "gal_ratio=null", "gal_mass=0.6"])
    assert cfg.train_args.comm_round == 2 and isinstance(cfg.fibec_args.g0, float)
    assert cfg.train_args.learning_rate == 0.005
    assert cfg.model_args.lora_target_modules == ["query", "value"]
    assert cfg.fibec_args.gal_ratio is None and cfg.fibec_args.gal_mass == 0.6


def test_file_values_and_overrides_apply_in_order(tmp_path):
    path = write(tmp_path, {"train_args": {"comm_round": 5, "learning_rate": 0.01}})
    cfg = load_config(path, ["comm_round=7"])
    assert cfg.train_args.comm_round == 7 and cfg.train_args.learning_rate == 0.01


@pytest.mark.parametrize("overrides, words", [
    (["comm_rnd=2"], ["comm_rnd", "comm_round"]),
    (["comm_round=two"], ["comm_round", "int"]),
    (["client_optimizer=adam"], ["client_optimizer", "adamw"]),
    (["gal_ratio=1.5"], ["gal_ratio", "(0, 1]"]),
    (["gal_mass=0.5"], ["gal_mass", "exactly one"]),
    (["client_num_per_round=200"], ["client_num_per_round", "client_num_in_total"]),
    (["data_source=files"], ["train_file"]),
    (["data_source=files", "train_file=/no/such.csv"], ["train_file", "/no/such.csv"]),
    (["model=./missing_model_dir"], ["model", "missing_model_dir"]),
    (["worker_num=11"], ["worker_num", "client_num_per_round"]),
    (["worker_num=0"], ["worker_num"]),
    (["training_type=simulation", "federated_optimizer=FedAvg", "worker_num=3"], ["worker_num", "simulation"]),
    (["using_mlops=true"], ["using_mlops", "offline"]),
    (["backend=GRPC"], ["grpc_ipconfig_path"]),
    (["nosection.comm_round=1"], ["nosection"]),
    (["comm_round"], ["KEY=VALUE"]),
    (["eval_test_set=false"], ["validation_fraction", "eval_test_set"]),
])
def test_bad_overrides_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for word in words:
        assert word in str(err.value)


def test_fewer_client_processes_than_devices_per_round_is_allowed():
    assert load_config(None, ["worker_num=3"]).worker_num == 3


def _violating(rule):
    """Values each kind of field rule must reject."""
    kind, args = rule.kind, rule.args
    if kind == "at_least":
        return [args[0] - 1]
    if kind == "positive":
        return [0, -1]
    if kind == "non_negative":
        return [-1]
    if kind == "interval":
        lo, hi, lo_in, hi_in = args
        return [lo - 1, hi + 1] + ([] if lo_in else [lo]) + ([] if hi_in else [hi])
    if kind == "must_be":
        return [not args[0]]
    if kind == "nonempty_names":
        return [[], [1]]
    if kind == "dir_or_name":
        return ["./no_such_model_dir"]
    raise AssertionError(f"no violating value known for rule kind {kind!r}")


FIELD_RULES = [(section, f.name, f.metadata["check"]) for section, cls in SECTIONS.items()
               for f in dataclasses.fields(cls) if f.metadata.get("check") is not None]


@pytest.mark.parametrize("section, name, rule", FIELD_RULES, ids=[f"{s}.{n}" for s, n, _ in FIELD_RULES])
def test_each_field_rule_lives_with_its_field(section, name, rule):
    for value in _violating(rule):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{section}.{name}={json.dumps(value)}"])
        assert f"{section}.{name} = " in str(err.value) and rule.expected in str(err.value), str(err.value)


def test_bad_files_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="unknown section 'train_arg'.*train_args"):
        load_config(write(tmp_path, {"train_arg": {"comm_round": 1}}))
    with pytest.raises(ConfigError, match="unknown key 'train_args.local_epochs'"):
        load_config(write(tmp_path, {"train_args": {"local_epochs": 1}}))
    with pytest.raises(ConfigError, match="rank must not be set"):
        load_config(write(tmp_path, {"common_args": {"rank": 1}}))
    path = tmp_path / "broken.yaml"
    path.write_text("train_args: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def test_rank_count_must_match_clients_per_round():
    cfg = load_config(None, ["client_num_per_round=2", "client_num_in_total=4"])
    check_world(cfg, 3)
    with pytest.raises(ConfigError, match="needs 3 processes.*5 were started"):
        check_world(cfg, 5)
    with pytest.raises(ConfigError, match="mpirun -np 3"):
        check_world(cfg, 1)


def test_every_key_is_documented_once():
    table = describe_keys()
    for cls in SECTIONS.values():
        for name in cls.__dataclass_fields__:
            assert f"| `{name}` |" in table


def test_shipped_default_yaml_is_the_embedded_default():
    from pathlib import Path

    shipped = load_config(str(Path(__file__).resolve().parent.parent / "config" / "fibecfed_mr_minilm.yaml"))
    assert shipped.to_sections() == load_config().to_sections()


def test_every_shipped_config_is_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parent.parent / "config").glob("*.yaml")):
        if "gpu_mapping" not in path.name:
            load_config(str(path))


def test_config_doc_lists_every_key_as_the_schema_says():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md").read_text()
    assert describe_keys() in doc


def test_eval_only_last_keeps_the_last_rounds_of_the_evaluation_schedule():
    """Against the schedule written out: every frequency_of_the_test rounds and the last, then its last N."""
    from fedml_fibec.core.server_round import is_evaluation_round

    for rounds, every, last_n in [(20, 1, None), (20, 1, 3), (10, 3, 2), (10, 3, 1), (7, 2, 10), (5, 5, 3)]:
        cfg = load_config(None, [f"comm_round={rounds}", f"frequency_of_the_test={every}",
                                 f"eval_only_last={'null' if last_n is None else last_n}"])
        schedule = [r for r in range(rounds) if r % every == 0 or r == rounds - 1]
        expected = schedule if last_n is None else schedule[-last_n:]
        assert [r for r in range(rounds) if is_evaluation_round(cfg, r)] == expected


def test_flush_denormal_makes_this_process_treat_subnormal_floats_as_zero():
    """device_args.flush_denormal sets the CPU's flush mode (and the config's thread count); off, it is IEEE."""
    import torch

    from fedml_fibec.world import set_cpu_float_mode

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no x86 DAZ flag")
    tiny = torch.tensor([1e-40, 3e-39])  # below float32's smallest normal number (1.18e-38)
    threads = torch.get_num_threads()
    try:
        set_cpu_float_mode(load_config(None, ["flush_denormal=true"]), 1)
        assert torch.get_num_threads() == 1
        assert (tiny * 2).tolist() == [0.0, 0.0]
        assert (tiny @ torch.ones(2)).item() == 0.0
        set_cpu_float_mode(load_config(None), threads)
        assert (tiny * 2).tolist() == pytest.approx([2e-40, 6e-39], rel=1e-3)
        assert (tiny @ torch.ones(2)).item() == pytest.approx(3.1e-39, rel=1e-3)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
