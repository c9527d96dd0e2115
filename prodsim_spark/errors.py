"""Errors that carry their context (stage, path, row, key) so a user can act on them.

Every error a user can cause (a bad argument, config, input file, model location or a missing table)
is a :class:`ProdsimError`; the CLI prints it as ``prodsim COMMAND: error: [stage] [path] message``
and exits with its ``exit_code`` (2), never with a traceback. Anything else is a bug or an
infrastructure failure and exits 1.
"""
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


class InputError(ProdsimError):
    """An input file (labelled pairs or groups, a benchmark's dataset) is missing or malformed."""

    exit_code = 2


class CatalogError(InputError):
    """The catalog cannot be read or lacks a required column."""


class TableError(ProdsimError):
    """A table a command reads is missing or is not a Delta table (usually: an earlier stage has not run)."""

    exit_code = 2


class ModelError(ProdsimError):
    """An encoder's model folder or weights file is missing or does not fit the configured architecture."""

    exit_code = 2


class ConflictError(ProdsimError):
    """Another run committed to the same Delta table while this one was writing it."""

    exit_code = 2
