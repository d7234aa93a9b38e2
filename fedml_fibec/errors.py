"""Exception types of fedml-fibec: catch FibecError for any error this package raises on purpose."""
from __future__ import annotations


class FibecError(Exception):
    """Base class of the errors raised on purpose by fedml-fibec."""


class ConfigError(FibecError, ValueError):
    """A configuration key or value is missing or invalid."""


class DataError(FibecError, ValueError):
    """A data source, file, column or value cannot be used as asked."""


class AssetError(FibecError, RuntimeError):
    """An offline asset cannot be fetched, verified or extracted."""
