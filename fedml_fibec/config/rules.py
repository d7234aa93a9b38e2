"""The rules that relate keys to each other, and `validate`, which runs them after every field's own.

Why apart from the fields: a rule over two keys (or a key and the engine) belongs to neither field,
and these are the ones a rejected run is most often about, so they are gathered here in one short
list. Field checks run first, so a cross rule can trust each single value to be in range.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .fields import check_section
from .schema import BUILTIN_DATASETS, FEDML_METHODS, PAPER_TASK_NAMES, KEY_SECTION, METHODS, SECTIONS, RunConfig

DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def _require(cond: bool, key: str, value: Any, expected: str, source: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {KEY_SECTION.get(key, '?')}.{key} = {value!r}: expected {expected}")


def _check_data(cfg: RunConfig) -> None:
    """What data_source asks for must be there: a built-in name, or readable local files."""
    s, d = cfg.source, cfg.data_args
    if d.data_source == "builtin":
        _require(d.dataset in BUILTIN_DATASETS + PAPER_TASK_NAMES, "dataset", d.dataset,
                 f"a built-in dataset {list(BUILTIN_DATASETS)} or one of the paper's tasks {list(PAPER_TASK_NAMES)} "
                 "when data_source=builtin (any hub id: data_source=hub)", s)
    if d.task_copy is not None:
        _require(d.data_source in ("builtin", "hub") and d.dataset in PAPER_TASK_NAMES, "task_copy", d.task_copy,
                 f"null unless dataset names one of the paper's tasks {list(PAPER_TASK_NAMES)}", s)
        _require(Path(d.task_copy).is_dir(), "task_copy", d.task_copy,
                 "an existing folder written by DatasetDict.save_to_disk", s)
    if d.data_source == "files":
        _require(d.train_file is not None, "train_file", None, "a file path when data_source=files", s)
        for key in ("train_file", "test_file"):
            value = getattr(d, key)
            if value is not None:
                _require(Path(value).is_file(), key, value, "an existing file", s)
                _require(Path(value).suffix.lower() in DATA_SUFFIXES, key, value,
                         "a .csv, .tsv, .json, .jsonl or .parquet file", s)


def _check_sampling(cfg: RunConfig) -> None:
    t = cfg.train_args
    _require(t.client_num_per_round <= t.client_num_in_total, "client_num_per_round", t.client_num_per_round,
             f"between 1 and client_num_in_total ({t.client_num_in_total})", cfg.source)


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


def _check_workers(cfg: RunConfig) -> None:
    """Our cross-silo clients may serve several sampled devices in turn; FedML's simulation cannot."""
    s, n, per_round = cfg.source, cfg.device_args.worker_num, cfg.train_args.client_num_per_round
    if n is None:
        return
    if cfg.common_args.training_type == "simulation":
        _require(n == per_round, "worker_num", n,
                 f"null or equal to client_num_per_round ({per_round}) when training_type=simulation: "
                 "FedML's simulation-MPI runs one client process per sampled device", s)
    else:
        _require(n <= per_round, "worker_num", n,
                 f"null or between 1 and client_num_per_round ({per_round}): a client process serves one or "
                 "more of the round's sampled devices, never none", s)


def _check_gpu_mapping(cfg: RunConfig) -> None:
    s, dev = cfg.source, cfg.device_args
    if dev.using_gpu and dev.gpu_mapping_file is not None:
        _require(Path(dev.gpu_mapping_file).is_file(), "gpu_mapping_file", dev.gpu_mapping_file,
                 "an existing FedML gpu mapping YAML", s)
        _require(dev.gpu_mapping_key is not None, "gpu_mapping_key", None,
                 "the key inside gpu_mapping_file when it is set", s)


def _check_backend(cfg: RunConfig) -> None:
    """GRPC needs its address file and the cross-silo shape; MPI has no use for the silo timeouts."""
    s, c = cfg.source, cfg.comm_args
    if c.backend == "GRPC":
        _require(c.grpc_ipconfig_path is not None and Path(c.grpc_ipconfig_path).is_file(), "grpc_ipconfig_path",
                 c.grpc_ipconfig_path, "an existing ipconfig CSV when backend=GRPC (make one with "
                 "run_scripts/make_ipconfig.py)", s)
        _check_cross_silo(cfg)
        if not c.insecure:
            for key in ("tls_ca_cert", "tls_cert", "tls_key"):
                _require(getattr(c, key) is not None, key, None,
                         "a PEM file path when backend=GRPC (mutual TLS; make the files with "
                         "run_scripts/make_certs.py), or set insecure: true for a plaintext loopback try", s)
    else:
        for key in ("round_timeout_s", "min_silos_per_round"):
            _require(getattr(c, key) is None, key, getattr(c, key),
                     "null with backend=MPI (under mpirun a lost rank ends the whole job; the round timeout "
                     "is for backend=GRPC)", s)
        for key in ("tls_ca_cert", "tls_cert", "tls_key"):
            _require(getattr(c, key) is None, key, getattr(c, key),
                     "null with backend=MPI (TLS is for backend=GRPC; MPI relies on the cluster's network)", s)
        _require(not c.insecure, "insecure", c.insecure, "false with backend=MPI (it is a GRPC setting)", s)


def _check_cross_silo(cfg: RunConfig) -> None:
    """GRPC cross-silo: one process per silo, and each silo is one fixed device (its own data)."""
    s, t, c = cfg.source, cfg.train_args, cfg.comm_args
    _require(cfg.common_args.training_type == "cross_silo", "training_type", cfg.common_args.training_type,
             "cross_silo when backend=GRPC", s)
    _require(t.client_num_in_total == t.client_num_per_round, "client_num_in_total", t.client_num_in_total,
             f"equal to client_num_per_round ({t.client_num_per_round}) when backend=GRPC: every silo is one "
             "fixed device holding its own data (silo r serves device r-1 every round)", s)
    _require(cfg.device_args.worker_num in (None, t.client_num_per_round), "worker_num", cfg.device_args.worker_num,
             f"null or equal to client_num_per_round ({t.client_num_per_round}) when backend=GRPC: each silo is "
             "its own process serving its own device", s)
    _require(c.min_silos_per_round is None or c.min_silos_per_round <= t.client_num_per_round,
             "min_silos_per_round", c.min_silos_per_round,
             f"null (all silos) or between 1 and client_num_per_round ({t.client_num_per_round})", s)


def _check_gal(cfg: RunConfig) -> None:
    fb = cfg.fibec_args
    _require((fb.gal_ratio is None) != (fb.gal_mass is None), "gal_mass", fb.gal_mass,
             f"exactly one of gal_ratio ({fb.gal_ratio}) and gal_mass to be set (set the other to null)", cfg.source)


def _check_gal_warmup(cfg: RunConfig) -> None:
    """A warm-up must end before the last round, or no GAL is ever chosen."""
    w, n = cfg.fibec_args.gal_warmup_rounds, cfg.train_args.comm_round
    _require(w < n, "gal_warmup_rounds", w, f"fewer than comm_round ({n}) rounds (the GAL is chosen after them)",
             cfg.source)


def _check_local_work(cfg: RunConfig) -> None:
    """Local work is epochs over the samples in use, or a fixed number of steps: one of them must be set."""
    t = cfg.train_args
    _require(t.epochs is not None or t.local_steps is not None, "local_steps", None,
             "a number of steps when epochs is null (set epochs, local_steps, or both: epochs capped by local_steps)",
             cfg.source)


def _check_evaluation(cfg: RunConfig) -> None:
    """Without the test set, the validation set is all a run evaluates: it must hold one out."""
    if not cfg.validation_args.eval_test_set:
        d = cfg.data_args
        _require(d.validation_fraction > 0, "validation_fraction", d.validation_fraction,
                 "more than 0 when eval_test_set is false (the run would evaluate nothing)", cfg.source)


CROSS_RULES = (_check_data, _check_sampling, _check_engine, _check_workers, _check_gpu_mapping, _check_backend,
               _check_gal, _check_local_work, _check_gal_warmup, _check_evaluation)


def validate(cfg: RunConfig) -> None:
    """Check every value (its field's type, choices and rule), then every combination; raise ConfigError."""
    for section in SECTIONS:
        check_section(section, getattr(cfg, section), cfg.source)
    for rule in CROSS_RULES:
        rule(cfg)
