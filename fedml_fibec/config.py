"""The one config schema: FedML-style YAML sections, `--set` overrides, validation at start-up.

A run's configuration is a YAML file with FedML's sections (common_args, data_args, ...) plus our
`fibec_args`. Every key is declared once below with its type, default and help text; `load_config`
reads a file (or the embedded default), applies `--set KEY=VALUE` overrides, and `validate` checks
every value and combination before any work starts, raising ConfigError that names the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

BUILTIN_DATASETS = ("mr",)
BUILTIN_MODELS = ("minilm", "smollm2")
METHODS = ("FibecFed", "FedAvg", "FFA-LoRA", "FedSA-LoRA")  # our cross-silo path
# FedML's own algorithms on its simulation-MPI path (training_type: simulation), by FedML's names.
FEDML_METHODS = ("FedAvg", "FedProx", "FedOpt", "FedNova")
OPTIMIZER_CHOICES = METHODS + tuple(m for m in FEDML_METHODS if m not in METHODS)


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its help text (and allowed values) in the metadata."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CommonArgs:
    training_type: str = _f("cross_silo", "FedML engine. cross_silo: our trainer/aggregator hooks "
                            "(over MPI or GRPC); simulation: FedML's own simulation-MPI algorithms "
                            "(FedAvg, FedProx, FedOpt, FedNova) on our LoRA model (baselines).",
                            ("cross_silo", "simulation"))
    scenario: str = _f("horizontal", "FedML cross-silo scenario.", ("horizontal",))
    random_seed: int = _f(0, "Seed for the split, partition, client sampling, model init and batches.")
    using_mlops: bool = _f(False, "FedML's cloud tracking. Must stay false: runs are offline.")
    config_version: str = _f("release", "FedML environment name (unused offline).")


@dataclass
class DataArgs:
    data_source: str = _f("builtin", "Where the task comes from.", ("builtin", "files", "hub"))
    dataset: str = _f("mr", "Built-in dataset name (mr) or a `datasets` hub id / local dataset dir.")
    train_file: Optional[str] = _f(None, "data_source=files: training file (.csv .tsv .json .jsonl .parquet).")
    test_file: Optional[str] = _f(None, "data_source=files: test file; none = seeded stratified split.")
    text_column: str = _f("text", "Column holding the text.")
    text_pair_column: Optional[str] = _f(None, "Second text column for pair tasks (e.g. NLI).")
    label_column: str = _f("label", "Column holding the label (strings or integers).")
    hub_config: Optional[str] = _f(None, "data_source=hub: dataset configuration name.")
    test_fraction: float = _f(0.1, "Share of the data held out as global test set when no test split exists.")
    max_train_samples: Optional[int] = _f(None, "Stratified subsample of the training set (quick runs).")
    max_seq_length: int = _f(64, "Tokens per sample (padding/truncation).")
    partition_method: str = _f("dirichlet", "How training data is split over devices.", ("dirichlet", "iid"))
    partition_alpha: float = _f(1.0, "Dirichlet concentration of the label skew (smaller = more skewed).")
    min_samples_per_device: int = _f(16, "Every device gets at least this many training samples.")
    data_cache_dir: Optional[str] = _f(None, "Cache of the offline assets; default $FEDML_FIBEC_CACHE "
                                       "or ~/.cache/fedml_fibec.")


@dataclass
class ModelArgs:
    model: str = _f("minilm", "Built-in model (minilm, smollm2), a local model directory or a hub id.")
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA scaling alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target_modules: Optional[list] = _f(None, "Module names to adapt; none = chosen per architecture "
                                             "(attention query/value projections).")


@dataclass
class TrainArgs:
    federated_optimizer: str = _f("FibecFed", "FibecFed; FedAvg (plain federated LoRA); FFA-LoRA (A frozen, "
                                  "B shared); FedSA-LoRA (A shared, B kept on the device); with "
                                  "training_type=simulation FedML's FedAvg, FedProx, FedOpt or FedNova.",
                                  OPTIMIZER_CHOICES)
    client_num_in_total: int = _f(100, "Number of devices the data is partitioned over.")
    client_num_per_round: int = _f(10, "Devices sampled per round (= client processes).")
    comm_round: int = _f(20, "Training rounds.")
    local_steps: int = _f(8, "Local optimizer steps per device per round.")
    batch_size: int = _f(16, "Local minibatch size.")
    learning_rate: float = _f(2e-3, "Local learning rate.")
    lr_schedule: str = _f("cosine", "Local learning rate across rounds: constant, or cosine decay from "
                          "learning_rate at round 0 to min_lr_ratio * learning_rate at the last round.",
                          ("constant", "cosine"))
    min_lr_ratio: float = _f(0.1, "Final/initial learning rate ratio of the cosine schedule.")
    head_learning_rate: Optional[float] = _f(None, "Local learning rate of the classification head; "
                                             "null = learning_rate.")
    weight_decay: float = _f(0.0, "Local AdamW weight decay.")
    client_optimizer: str = _f("adamw", "Local optimizer.", ("adamw", "sgd"))
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    fedprox_mu: float = _f(0.01, "FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2 "
                           "(over the trainable LoRA + head tensors).")
    server_optimizer: str = _f("adam", "FedOpt: server optimizer on the averaged update (adam = FedAdam, "
                               "sgd = FedAvgM with server_momentum).", ("adam", "sgd"))
    server_lr: float = _f(0.01, "FedOpt: server learning rate (sgd with server_lr=1, momentum 0 = FedAvg).")
    server_momentum: float = _f(0.9, "FedOpt: SGD momentum, or Adam's beta1.")


@dataclass
class ValidationArgs:
    frequency_of_the_test: int = _f(1, "Evaluate the global model every N rounds (and at the last).")
    eval_batch_size: int = _f(64, "Batch size for evaluation.")
    device_eval_samples: int = _f(128, "Global-test samples each participating device evaluates its own "
                                  "model on (0 = skip device accuracy).")


@dataclass
class DeviceArgs:
    using_gpu: bool = _f(False, "Place each rank on a GPU from FedML's gpu mapping.")
    gpu_mapping_file: Optional[str] = _f(None, "FedML gpu mapping YAML (using_gpu).")
    gpu_mapping_key: Optional[str] = _f(None, "Key inside gpu_mapping_file.")
    worker_num: Optional[int] = _f(None, "Client processes; none = client_num_per_round.")
    torch_threads: int = _f(0, "Torch threads per rank; 0 = CPU cores / ranks (at least 1).")
    bf16: bool = _f(False, "bfloat16 autocast for local training on GPU.")


@dataclass
class CommArgs:
    backend: str = _f("MPI", "FedML communication backend.", ("MPI", "GRPC"))
    grpc_ipconfig_path: Optional[str] = _f(None, "GRPC: FedML ipconfig CSV (eid,rank,grpc_server_ip,"
                                           "grpc_server_port).")
    payload_dtype: str = _f("float32", "Dtype of tensors on the wire.", ("float32", "bfloat16", "float16"))
    round_timeout_s: Optional[float] = _f(None, "GRPC: seconds the server waits for a round's uploads (and for "
                                          "silos at start-up and at the end) before going on with the silos "
                                          "that answered; null = wait forever (FedML's behaviour).")
    min_silos_per_round: Optional[int] = _f(None, "GRPC: fewest silos that must answer a timed-out round for it "
                                            "to count (the others are dropped until they come back); fewer "
                                            "stops the run with an error. null = all silos.")
    connect_timeout_s: float = _f(120.0, "GRPC: seconds a process keeps retrying to reach a peer that is not "
                                  "(yet) listening, e.g. a silo started before the server.")


@dataclass
class TrackingArgs:
    enable_wandb: bool = _f(False, "Weights & Biases logging (must stay false offline).")
    log_level: str = _f("INFO", "Log level.", ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class FibecArgs:
    wrt: str = _f("embeddings", "Fisher difficulty with respect to input embeddings or LoRA tensors.",
                  ("embeddings", "lora"))
    normalize: str = _f("none", "Divide a sample's Fisher trace by its token count.", ("none", "tokens"))
    fisher: str = _f("empirical", "empirical: given label; true: expectation over the model's labels.",
                     ("empirical", "true"))
    g0: float = _f(0.2, "Initial curriculum share of the easiest samples (1 = curriculum off).")
    T_c: Optional[float] = _f(None, "Rounds until the whole data set is used; none = half the rounds.")
    p: float = _f(0.5, "Pacing exponent (1 = linear).")
    min_samples: int = _f(16, "Fewest samples a device trains on in a round.")
    stratify_by_label: bool = _f(True, "Curriculum subsets keep the device's label shares (easiest first "
                                 "within each class); false = easiest overall.")
    refresh_every: int = _f(0, "Recompute difficulty every N participations of a device (0 = never).")
    scoring_batch_size: int = _f(32, "Batch size of the difficulty scoring pass.")
    layer_score: str = _f("perturbation", "Layer sensitivity score.", ("perturbation", "grad_sensitivity"))
    sigma: float = _f(0.1, "Relative scale of the Gaussian embedding perturbation.")
    layer_score_samples: int = _f(64, "Local samples a device uses to score layer sensitivity.")
    gal_ratio: Optional[float] = _f(0.5, "Share of blocks chosen as global aggregation layers (GAL).")
    gal_mass: Optional[float] = _f(None, "Instead of gal_ratio: smallest top set holding this share of "
                                   "the total layer score.")
    reselect_every: int = _f(0, "Re-select the GAL every N rounds (0 = once).")
    beta: float = _f(0.9, "Momentum of the neuron scores.")
    rho: float = _f(0.25, "Share of non-GAL neurons updated in a device's participation.")
    state_dir: Optional[str] = _f(None, "Per-device state store (shared by all ranks); none = <out>/device_state.")


SECTIONS: dict[str, type] = {
    "common_args": CommonArgs,
    "data_args": DataArgs,
    "model_args": ModelArgs,
    "train_args": TrainArgs,
    "validation_args": ValidationArgs,
    "device_args": DeviceArgs,
    "comm_args": CommArgs,
    "tracking_args": TrackingArgs,
    "fibec_args": FibecArgs,
}


@dataclass
class RunConfig:
    common_args: CommonArgs = field(default_factory=CommonArgs)
    data_args: DataArgs = field(default_factory=DataArgs)
    model_args: ModelArgs = field(default_factory=ModelArgs)
    train_args: TrainArgs = field(default_factory=TrainArgs)
    validation_args: ValidationArgs = field(default_factory=ValidationArgs)
    device_args: DeviceArgs = field(default_factory=DeviceArgs)
    comm_args: CommArgs = field(default_factory=CommArgs)
    tracking_args: TrackingArgs = field(default_factory=TrackingArgs)
    fibec_args: FibecArgs = field(default_factory=FibecArgs)
    source: str = "<embedded default>"

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """The config as FedML-style YAML sections."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def get(self, key: str) -> Any:
        """Value of a flat key (keys are unique across sections)."""
        section, name = _locate(key, self.source)
        return getattr(getattr(self, section), name)

    @property
    def curriculum_rounds(self) -> float:
        """T_c resolved: rounds until the whole local data set is used."""
        t_c = self.fibec_args.T_c
        return self.train_args.comm_round / 2 if t_c is None else t_c

    @property
    def worker_num(self) -> int:
        """Client processes."""
        return self.device_args.worker_num or self.train_args.client_num_per_round


def _key_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in index, f"config key {f.name} declared twice"
            index[f.name] = section
    return index


KEY_SECTION = _key_index()


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _locate(key: str, source: str) -> tuple[str, str]:
    """Map 'key' or 'section.key' to (section, key), or raise ConfigError."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}{_suggest(section, SECTIONS)}; "
                              f"sections are {', '.join(SECTIONS)}")
        if name not in {f.name for f in fields(SECTIONS[section])}:
            raise ConfigError(f"{source}: unknown key {key!r}"
                              f"{_suggest(name, [f.name for f in fields(SECTIONS[section])])}")
        return section, name
    if key not in KEY_SECTION:
        raise ConfigError(f"{source}: unknown config key {key!r}{_suggest(key, KEY_SECTION)}")
    return KEY_SECTION[key], key


def _type_ok(value: Any, annotation: Any) -> bool:
    ann = eval(annotation, {**typing.__dict__, "Optional": Optional}) if isinstance(annotation, str) else annotation
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is list:
        return isinstance(value, list)
    return isinstance(value, ann)


def _type_name(annotation: str) -> str:
    return annotation.replace("Optional[", "").rstrip("]") + (" or null" if "Optional" in annotation else "")


def _set_value(cfg: RunConfig, section: str, name: str, value: Any, where: str) -> None:
    f = next(f for f in fields(SECTIONS[section]) if f.name == name)
    if isinstance(value, str) and "float" in str(f.type):
        # PyYAML (YAML 1.1) reads 5e-3 as a string; a user writing it means the number.
        try:
            value = float(value)
        except ValueError:
            pass
    if not _type_ok(value, f.type):
        raise ConfigError(f"{where}: {section}.{name} = {value!r} has the wrong type: expected {_type_name(f.type)}")
    if isinstance(value, int) and not isinstance(value, bool) and "float" in str(f.type):
        value = float(value)
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{where}: {section}.{name} = {value!r} is not allowed: expected one of {list(choices)}")
    setattr(getattr(cfg, section), name, value)


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'key=value' and parse the value as YAML (so 2 -> int, true -> bool, null -> None)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
    return key.strip(), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read a YAML config (None = embedded default), apply KEY=VALUE overrides and validate."""
    cfg = RunConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        cfg.source = str(p)
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
        for section, values in raw.items():
            if section not in SECTIONS:
                raise ConfigError(f"{p}: unknown section {section!r}{_suggest(str(section), SECTIONS)}; "
                                  f"sections are {', '.join(SECTIONS)}")
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{p}: section {section!r} must be a mapping of keys")
            for name, value in values.items():
                if name in ("rank", "role"):
                    raise ConfigError(f"{p}: {section}.{name} must not be set in YAML: FedML takes it from "
                                      "the launcher (mpirun rank / command line)")
                sec, key = _locate(f"{section}.{name}", str(p))
                _set_value(cfg, sec, key, value, str(p))
    if overrides:
        cfg.source = f"{cfg.source} with --set overrides"
    for text in overrides:
        key, value = parse_override(text)
        section, name = _locate(key, f"--set {text}")
        _set_value(cfg, section, name, value, f"--set {text}")
    validate(cfg)
    return cfg


def _require(cond: bool, key: str, value: Any, expected: str, source: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {KEY_SECTION.get(key, '?')}.{key} = {value!r}: expected {expected}")


def validate(cfg: RunConfig) -> None:
    """Check every value range and combination; raise ConfigError naming the key."""
    s = cfg.source
    d, m, t, v, fb, dev, c = (cfg.data_args, cfg.model_args, cfg.train_args, cfg.validation_args,
                              cfg.fibec_args, cfg.device_args, cfg.comm_args)
    _require(not cfg.common_args.using_mlops, "using_mlops", True, "false (runs are offline)", s)
    _require(not cfg.tracking_args.enable_wandb, "enable_wandb", True, "false (runs are offline)", s)
    # data
    if d.data_source == "builtin":
        _require(d.dataset in BUILTIN_DATASETS, "dataset", d.dataset,
                 f"a built-in dataset {list(BUILTIN_DATASETS)} when data_source=builtin", s)
    if d.data_source == "files":
        _require(d.train_file is not None, "train_file", None, "a file path when data_source=files", s)
        for key in ("train_file", "test_file"):
            value = getattr(d, key)
            if value is not None:
                _require(Path(value).is_file(), key, value, "an existing file", s)
                _require(Path(value).suffix.lower() in (".csv", ".tsv", ".json", ".jsonl", ".parquet"), key,
                         value, "a .csv, .tsv, .json, .jsonl or .parquet file", s)
    _require(0 < d.test_fraction < 1, "test_fraction", d.test_fraction, "a number in (0, 1)", s)
    _require(d.max_train_samples is None or d.max_train_samples > 0, "max_train_samples", d.max_train_samples,
             "a positive integer or null", s)
    _require(d.max_seq_length >= 8, "max_seq_length", d.max_seq_length, "at least 8", s)
    _require(d.partition_alpha > 0, "partition_alpha", d.partition_alpha, "a positive number", s)
    _require(d.min_samples_per_device >= 1, "min_samples_per_device", d.min_samples_per_device, "at least 1", s)
    # model
    if m.model not in BUILTIN_MODELS and m.model.startswith((".", "/", "~")):
        _require(Path(m.model).expanduser().is_dir(), "model", m.model,
                 f"a built-in model {list(BUILTIN_MODELS)}, an existing model directory or a hub id", s)
    _require(m.lora_r >= 1, "lora_r", m.lora_r, "at least 1", s)
    _require(m.lora_alpha >= 1, "lora_alpha", m.lora_alpha, "at least 1", s)
    _require(0 <= m.lora_dropout < 1, "lora_dropout", m.lora_dropout, "a number in [0, 1)", s)
    _require(m.lora_target_modules is None or (len(m.lora_target_modules) > 0
                                              and all(isinstance(x, str) for x in m.lora_target_modules)),
             "lora_target_modules", m.lora_target_modules, "a non-empty list of module names or null", s)
    # training
    _require(t.client_num_in_total >= 1, "client_num_in_total", t.client_num_in_total, "at least 1", s)
    _require(1 <= t.client_num_per_round <= t.client_num_in_total, "client_num_per_round",
             t.client_num_per_round, f"between 1 and client_num_in_total ({t.client_num_in_total})", s)
    _require(t.comm_round >= 1, "comm_round", t.comm_round, "at least 1", s)
    _require(t.local_steps >= 1, "local_steps", t.local_steps, "at least 1", s)
    _require(t.batch_size >= 1, "batch_size", t.batch_size, "at least 1", s)
    _require(t.learning_rate > 0, "learning_rate", t.learning_rate, "a positive number", s)
    _require(0 < t.min_lr_ratio <= 1, "min_lr_ratio", t.min_lr_ratio, "a number in (0, 1]", s)
    _require(t.head_learning_rate is None or t.head_learning_rate > 0, "head_learning_rate",
             t.head_learning_rate, "a positive number or null", s)
    _require(t.weight_decay >= 0, "weight_decay", t.weight_decay, "a non-negative number", s)
    _require(t.max_grad_norm >= 0, "max_grad_norm", t.max_grad_norm, "a non-negative number", s)
    _require(t.fedprox_mu >= 0, "fedprox_mu", t.fedprox_mu, "a non-negative number", s)
    _require(t.server_lr > 0, "server_lr", t.server_lr, "a positive number", s)
    _require(0 <= t.server_momentum < 1, "server_momentum", t.server_momentum, "a number in [0, 1)", s)
    _check_engine(cfg)
    # validation
    _require(v.frequency_of_the_test >= 1, "frequency_of_the_test", v.frequency_of_the_test, "at least 1", s)
    _require(v.eval_batch_size >= 1, "eval_batch_size", v.eval_batch_size, "at least 1", s)
    _require(v.device_eval_samples >= 0, "device_eval_samples", v.device_eval_samples, "0 or more", s)
    # device / comm
    _require(dev.worker_num is None or dev.worker_num == t.client_num_per_round, "worker_num", dev.worker_num,
             f"null or equal to client_num_per_round ({t.client_num_per_round}): each client process serves "
             "one sampled device per round", s)
    _require(dev.torch_threads >= 0, "torch_threads", dev.torch_threads, "0 (auto) or more", s)
    if dev.using_gpu and dev.gpu_mapping_file is not None:
        _require(Path(dev.gpu_mapping_file).is_file(), "gpu_mapping_file", dev.gpu_mapping_file,
                 "an existing FedML gpu mapping YAML", s)
        _require(dev.gpu_mapping_key is not None, "gpu_mapping_key", None,
                 "the key inside gpu_mapping_file when it is set", s)
    if c.backend == "GRPC":
        _require(c.grpc_ipconfig_path is not None and Path(c.grpc_ipconfig_path).is_file(), "grpc_ipconfig_path",
                 c.grpc_ipconfig_path, "an existing ipconfig CSV when backend=GRPC (make one with "
                 "run_scripts/make_ipconfig.py)", s)
        _check_cross_silo(cfg)
    else:
        for key in ("round_timeout_s", "min_silos_per_round"):
            _require(getattr(c, key) is None, key, getattr(c, key),
                     "null with backend=MPI (under mpirun a lost rank ends the whole job; the round timeout "
                     "is for backend=GRPC)", s)
    _require(c.connect_timeout_s > 0, "connect_timeout_s", c.connect_timeout_s, "a positive number of seconds", s)
    # fibec
    _require(0 < fb.g0 <= 1, "g0", fb.g0, "a number in (0, 1]", s)
    _require(fb.T_c is None or fb.T_c >= 0, "T_c", fb.T_c, "null or a non-negative number of rounds", s)
    _require(fb.p > 0, "p", fb.p, "a positive number", s)
    _require(fb.min_samples >= 1, "min_samples", fb.min_samples, "at least 1", s)
    _require(fb.refresh_every >= 0, "refresh_every", fb.refresh_every, "0 (never) or more", s)
    _require(fb.scoring_batch_size >= 1, "scoring_batch_size", fb.scoring_batch_size, "at least 1", s)
    _require(fb.sigma >= 0, "sigma", fb.sigma, "a non-negative number", s)
    _require(fb.layer_score_samples >= 1, "layer_score_samples", fb.layer_score_samples, "at least 1", s)
    _require((fb.gal_ratio is None) != (fb.gal_mass is None), "gal_mass", fb.gal_mass,
             f"exactly one of gal_ratio ({fb.gal_ratio}) and gal_mass to be set (set the other to null)", s)
    if fb.gal_ratio is not None:
        _require(0 < fb.gal_ratio <= 1, "gal_ratio", fb.gal_ratio, "a number in (0, 1]", s)
    if fb.gal_mass is not None:
        _require(0 < fb.gal_mass <= 1, "gal_mass", fb.gal_mass, "a number in (0, 1]", s)
    _require(fb.reselect_every >= 0, "reselect_every", fb.reselect_every, "0 (once) or more", s)
    _require(0 <= fb.beta < 1, "beta", fb.beta, "a number in [0, 1)", s)
    _require(0 < fb.rho <= 1, "rho", fb.rho, "a number in (0, 1]", s)


def _check_engine(cfg: RunConfig) -> None:
    """Each method runs on one engine: ours on cross_silo, FedML's built-ins on simulation (MPI)."""
    s, t, engine = cfg.source, cfg.train_args, cfg.common_args.training_type
    method = t.federated_optimizer
    if engine == "simulation":
        _require(method in FEDML_METHODS, "federated_optimizer", method,
                 f"one of FedML's {list(FEDML_METHODS)} when training_type=simulation ({method} runs on "
                 "training_type=cross_silo)", s)
        _require(cfg.comm_args.backend == "MPI", "backend", cfg.comm_args.backend,
                 "MPI when training_type=simulation (FedML's simulation-MPI path)", s)
        # FedML's simulation clients only stop after the message of round comm_round-1 (round >= 1).
        _require(t.comm_round >= 2, "comm_round", t.comm_round,
                 "at least 2 when training_type=simulation (FedML's clients never stop after 1 round)", s)
        if method == "FedNova":
            _require(t.client_optimizer == "sgd", "client_optimizer", t.client_optimizer,
                     "sgd for FedNova: its normalized averaging is defined for SGD local steps", s)
    else:
        _require(method in METHODS, "federated_optimizer", method,
                 f"one of {list(METHODS)} when training_type=cross_silo ({method} is FedML's own: "
                 "set training_type=simulation)", s)


def _check_cross_silo(cfg: RunConfig) -> None:
    """GRPC cross-silo: one process per silo, and each silo is one fixed device (its own data)."""
    s, t, c = cfg.source, cfg.train_args, cfg.comm_args
    _require(cfg.common_args.training_type == "cross_silo", "training_type", cfg.common_args.training_type,
             "cross_silo when backend=GRPC", s)
    _require(t.client_num_in_total == t.client_num_per_round, "client_num_in_total", t.client_num_in_total,
             f"equal to client_num_per_round ({t.client_num_per_round}) when backend=GRPC: every silo is one "
             "fixed device holding its own data (silo r serves device r-1 every round)", s)
    _require(c.round_timeout_s is None or c.round_timeout_s > 0, "round_timeout_s", c.round_timeout_s,
             "null (wait forever) or a positive number of seconds", s)
    _require(c.min_silos_per_round is None or 1 <= c.min_silos_per_round <= t.client_num_per_round,
             "min_silos_per_round", c.min_silos_per_round,
             f"null (all silos) or between 1 and client_num_per_round ({t.client_num_per_round})", s)


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML sections."""
    return yaml.safe_dump(cfg.to_sections(), sort_keys=False)


def describe_keys() -> str:
    """Markdown table of every key, its section, default and help (for docs)."""
    rows = ["| key | section | default | meaning |", "|---|---|---|---|"]
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_ = f.metadata["help"]
            if f.metadata.get("choices"):
                help_ += f" One of: {', '.join(map(str, f.metadata['choices']))}."
            rows.append(f"| `{f.name}` | {section} | `{default}` | {help_} |")
    return "\n".join(rows)
