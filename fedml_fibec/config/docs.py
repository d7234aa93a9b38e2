"""The key table of docs/CONFIG.md, generated from the schema's field metadata.

Why generated: the help text users read is the help text stored on the field, and a test checks
that the doc holds exactly this table, so the doc cannot describe a key that is not (or no longer)
what the code enforces.
"""
from __future__ import annotations

import dataclasses
from dataclasses import fields

from .schema import SECTIONS


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
