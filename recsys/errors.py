"""Exception hierarchy for user-facing failures.

Anything raised from these classes is a *bad input* problem (spec, data row, checkpoint, CLI argument) that
the CLI reports as a one-line ``error: <message>`` without a traceback. Programming errors stay ordinary
exceptions so they keep their tracebacks.
"""

from __future__ import annotations


class RecsysError(Exception):
    """Base class of all errors that the CLI reports without a traceback."""


class SpecError(RecsysError):
    """A feature spec (YAML file or ``--set`` override) is invalid.

    The message has one line per problem; the loader also sets ``issues`` (``recsys.spec.loader.SpecIssue``
    records with file, line, key path and message) for callers that want them structured.
    """

    issues: tuple = ()


class DataError(RecsysError):
    """Input data (a row, a file, a table) is missing or malformed."""


class CheckpointError(RecsysError):
    """A checkpoint is missing, corrupt or incompatible with the spec."""


class NumericsError(RecsysError):
    """Training produced non-finite values (NaN/Inf loss or gradients)."""


__all__ = ["RecsysError", "SpecError", "DataError", "CheckpointError", "NumericsError"]
