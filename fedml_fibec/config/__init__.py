"""The one config schema: FedML-style YAML sections, `--set` overrides, validation at start-up.

Why a package: each key is declared once with its help text and its own check (schema.py, with the
rule helpers of fields.py), the few rules relating keys sit together (rules.py), and reading files
and overrides (loading.py) stays apart from both. Import from here; the modules are the layout,
this namespace is the API.
"""
from ..errors import ConfigError
from .docs import describe_keys
from .fields import Rule, option
from .loading import PLACEMENT_KEYS, config_differences, dump_yaml, load_config, parse_override
from .rules import CROSS_RULES, validate
from .schema import (BUILTIN_DATASETS, BUILTIN_MODELS, FEDML_METHODS, KEY_SECTION, METHODS, OPTIMIZER_CHOICES,
                     SECTIONS, CommArgs, CommonArgs, DataArgs, DeviceArgs, FibecArgs, ModelArgs, RunConfig,
                     TrackingArgs, TrainArgs, ValidationArgs)

__all__ = [
    "BUILTIN_DATASETS", "BUILTIN_MODELS", "CROSS_RULES", "FEDML_METHODS", "KEY_SECTION", "METHODS",
    "OPTIMIZER_CHOICES", "PLACEMENT_KEYS", "SECTIONS", "CommArgs", "CommonArgs", "ConfigError", "DataArgs", "DeviceArgs",
    "FibecArgs", "ModelArgs", "Rule", "RunConfig", "TrackingArgs", "TrainArgs", "ValidationArgs",
    "config_differences", "describe_keys", "dump_yaml", "load_config", "option", "parse_override", "validate",
]
