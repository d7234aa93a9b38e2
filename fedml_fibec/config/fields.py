"""Config fields that carry their own help text and check, in the style of peft's LoraConfig.

Why: a key's meaning, its allowed values and the rule that rejects a bad value are declared in one
place, so a new key cannot be added without deciding its check, and the docs table cannot drift
from what is enforced. A field check looks at that one value only; rules that relate two keys live
in rules.py. Types come from `typing.get_type_hints` (the real annotations, never `eval`).
"""
from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """A check on one value: `test(value)` must hold, else the error says `expected`.

    `kind` and `args` name the rule (at_least, (1,)) so that tests and tools can reason about it
    without calling it; `test` never sees None (null passes wherever the type allows it).
    """

    test: Callable[[Any], bool]
    expected: str
    kind: str
    args: tuple = ()


def at_least(n: int, expected: str | None = None) -> Rule:
    return Rule(lambda v: v >= n, expected or f"at least {n}", "at_least", (n,))


def positive(expected: str = "a positive number") -> Rule:
    return Rule(lambda v: v > 0, expected, "positive")


def non_negative(expected: str = "a non-negative number") -> Rule:
    return Rule(lambda v: v >= 0, expected, "non_negative")


def in_interval(spec: str) -> Rule:
    """A number in an interval written as in maths: "(0, 1]" excludes 0 and includes 1."""
    assert spec[0] in "([" and spec[-1] in ")]", f"bad interval {spec!r}"
    lo_text, hi_text = spec[1:-1].split(",")
    lo, hi, lo_in, hi_in = float(lo_text), float(hi_text), spec[0] == "[", spec[-1] == "]"

    def test(v: float) -> bool:
        return (lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)
    return Rule(test, f"a number in {spec}", "interval", (lo, hi, lo_in, hi_in))


def must_be(value: Any, expected: str) -> Rule:
    """The one value a key may hold in this build (e.g. offline-only switches)."""
    return Rule(lambda v: v == value, expected, "must_be", (value,))


def nonempty_names(what: str = "names") -> Rule:
    return Rule(lambda v: len(v) > 0 and all(isinstance(x, str) for x in v), f"a non-empty list of {what}",
                "nonempty_names")


def dir_or_name(names: tuple, expected: str) -> Rule:
    """One of `names`, an id (no path prefix), or - when written as a path - an existing directory.

    A value starting with . / ~ is surely meant as a local path; failing here beats a hub lookup
    that cannot succeed offline.
    """
    def test(v: str) -> bool:
        return v in names or not v.startswith((".", "/", "~")) or Path(v).expanduser().is_dir()
    return Rule(test, expected, "dir_or_name", (names,))


def option(default: Any, help: str, choices: tuple | None = None, check: Rule | None = None) -> Any:
    """A config field with its help text, allowed values and own check in the metadata."""
    meta = {"help": help, "choices": choices, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parts(tp: Any) -> tuple[tuple, bool]:
    """(the non-None member types, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (tp,), False


def _is(value: Any, tp: type) -> bool:
    if tp in (int, float) and isinstance(value, bool):
        return False  # YAML true is no number
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(value, typing.get_origin(tp) or tp)


def type_ok(value: Any, tp: Any) -> bool:
    members, nullable = _parts(tp)
    return (value is None and nullable) or any(_is(value, t) for t in members)


def type_name(tp: Any) -> str:
    members, nullable = _parts(tp)
    return " or ".join(getattr(t, "__name__", str(t)) for t in members) + (" or null" if nullable else "")


def coerce(section: str, cls: type, name: str, value: Any, where: str) -> Any:
    """`value` as the field stores it, or ConfigError: type and choices, checked as each value is set."""
    tp = type_hints(cls)[name]
    wants_float = float in _parts(tp)[0]
    if isinstance(value, str) and wants_float:
        # PyYAML (YAML 1.1) reads 5e-3 as a string; a user writing it means the number.
        try:
            value = float(value)
        except ValueError:
            pass
    if not type_ok(value, tp):
        raise ConfigError(f"{where}: {section}.{name} = {value!r} has the wrong type: expected {type_name(tp)}")
    if wants_float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    choices = cls.__dataclass_fields__[name].metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{where}: {section}.{name} = {value!r} is not allowed: expected one of {list(choices)}")
    return value


def check_section(section: str, values: Any, source: str) -> None:
    """Every field's type, choices and own rule, on the final values (after all overrides)."""
    cls = type(values)
    for f in fields(cls):
        value = coerce(section, cls, f.name, getattr(values, f.name), source)
        rule: Rule | None = f.metadata.get("check")
        if rule is None or value is None:
            continue
        if not rule.test(value):
            expected = rule.expected
            if _parts(type_hints(cls)[f.name])[1] and "null" not in expected:
                expected = f"null or {expected}"
            raise ConfigError(f"{source}: {section}.{f.name} = {value!r}: expected {expected}")
