"""The exceptions regsearch raises; the CLI maps them to exit codes in one place."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RegsearchError(Exception):
    """Root of every error regsearch raises on purpose."""

    exit_code = 1


class ConfigError(RegsearchError, ValueError):
    """A study file, an option or a command-line value is wrong (bad input, exit 2)."""

    exit_code = 2


class PluginError(RegsearchError):
    """A regularizer plugin could not be loaded or breaks the contract (bad input, exit 2)."""

    exit_code = 2


class DataError(RegsearchError):
    """A dataset is missing, corrupt or malformed (bad input, exit 2)."""

    exit_code = 2


class StorageError(RegsearchError):
    """The Optuna storage or the MLflow tracking store cannot be used (bad input, exit 2)."""

    exit_code = 2


class TrialError(RegsearchError):
    """A single trial failed (divergence, a plugin raising); the study goes on."""


class TrialDiverged(TrialError):
    """The training loss became NaN or infinite."""


class StudyError(RegsearchError):
    """The study as a whole cannot go on (run-time failure, exit 1)."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, '' when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(what: str, name: str, known: Iterable[str]) -> str:
    """"unknown <what> 'x'; known: a, b, c (did you mean 'y'?)"."""
    known = sorted(known)
    return f"unknown {what} {name!r}{did_you_mean(name, known)}; known: {', '.join(known) or 'none'}"
