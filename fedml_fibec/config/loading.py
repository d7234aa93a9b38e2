"""Reading a run's config: a YAML file (or the embedded default), then `--set KEY=VALUE` overrides.

Why types are checked here but ranges in `validate`: a wrong type is a typo in that one line and is
best reported with the file or `--set` that wrote it, while a range may be fixed by a later
override, so ranges and combinations are judged once, on the final values.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .fields import coerce
from .rules import validate
from .schema import KEY_SECTION, SECTIONS, RunConfig


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
        names = [f.name for f in fields(SECTIONS[section])]
        if name not in names:
            raise ConfigError(f"{source}: unknown key {key!r}{_suggest(name, names)}")
        return section, name
    if key not in KEY_SECTION:
        raise ConfigError(f"{source}: unknown config key {key!r}{_suggest(key, KEY_SECTION)}")
    return KEY_SECTION[key], key


def _set_value(cfg: RunConfig, section: str, name: str, value: Any, where: str) -> None:
    setattr(getattr(cfg, section), name, coerce(section, SECTIONS[section], name, value, where))


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


def _read_file(cfg: RunConfig, p: Path) -> None:
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


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read a YAML config (None = embedded default), apply KEY=VALUE overrides and validate."""
    cfg = RunConfig()
    if path is not None:
        _read_file(cfg, Path(path))
    if overrides:
        cfg.source = f"{cfg.source} with --set overrides"
    for text in overrides:
        key, value = parse_override(text)
        section, name = _locate(key, f"--set {text}")
        _set_value(cfg, section, name, value, f"--set {text}")
    validate(cfg)
    return cfg


# Keys that say where and how a run executes (reaching and waiting for peers, logging, placement),
# not what it computes: a run resumed, or a finished run reused, with other values is the same run.
PLACEMENT_KEYS = frozenset({
    "worker_num", "grpc_ipconfig_path", "round_timeout_s", "min_silos_per_round", "connect_timeout_s",
    "log_level", "torch_threads", "data_cache_dir", "using_gpu", "gpu_mapping_file", "gpu_mapping_key"})


# Keys added after runs were saved whose default does what every run before them did (the server's
# evaluation schedule, added with tuning runs; flushing subnormal floats, off by default): a saved config
# without such a key describes the same run as one with the key at its default, so runs made before it
# keep being reused.
KEYS_WITH_PAST_DEFAULT = frozenset({"eval_test_set", "eval_only_last", "flush_denormal"})


def _past_default(section: str, key: str, value: Any, saved_section: dict[str, Any]) -> bool:
    if key not in KEYS_WITH_PAST_DEFAULT or key in saved_section:
        return False
    return value == next(f.default for f in fields(SECTIONS[section]) if f.name == key)


def config_differences(cfg: RunConfig, saved: dict[str, dict[str, Any]]) -> list[str]:
    """`section.key: saved -> now` for every key (placement keys aside) where `cfg` differs from the
    sections of a saved config (a run's config.yaml); empty when they describe the same run."""
    return [f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
            for section, values in cfg.to_sections().items() for key, value in values.items()
            if key not in PLACEMENT_KEYS and saved.get(section, {}).get(key) != value
            and not _past_default(section, key, value, saved.get(section, {}))]


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML sections."""
    return yaml.safe_dump(cfg.to_sections(), sort_keys=False)
