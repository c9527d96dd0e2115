"""Errors that carry their context (stage, path, row, key) so a user can act on them."""
from __future__ import annotations


class ProdsimError(Exception):
    """Base class: ``str(err)`` is a complete, user-facing message."""

    exit_code = 1

    def __init__(self, message: str, *, stage: str | None = None, path: str | None = None):
        self.stage, self.path = stage, path
        prefix = "".join(f"[{p}] " for p in (stage, path) if p)
        super().__init__(prefix + message)


class ConfigError(ProdsimError):
    """Bad configuration or arguments: detected before any Spark work starts."""

    exit_code = 2


class CatalogError(ProdsimError):
    """The catalog cannot be read or lacks a required column."""

    exit_code = 2
