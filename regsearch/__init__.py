"""regsearch: search combinations of neural-network regularizers with Optuna, tracked in MLflow.

The public API is imported lazily, so that `import regsearch` (and the CLI's start-up) stays cheap until a
name that needs torch, Optuna or MLflow is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Regularizer": "regsearch._regularizer",
    "LoopState": "regsearch._regularizer",
    "TrialContext": "regsearch._regularizer",
    "register": "regsearch._registry",
    "default_registry": "regsearch._registry",
    "RegularizerRegistry": "regsearch._registry",
    "RegularizerInfo": "regsearch._registry",
    "optimize": "regsearch._study",
    "confirm": "regsearch._confirm",
    "leaderboard": "regsearch._records",
    "StudySpec": "regsearch._spec",
    "Range": "regsearch._ranges",
    "parse_range": "regsearch._ranges",
    "Names": "regsearch._options",
    "load_study": "regsearch._study_file",
    "spec_from_dict": "regsearch._spec",
    "TensorData": "regsearch.data._tensors",
    "load_images": "regsearch.data.images",
    "images_from_dataset": "regsearch.data.images",
    "RegsearchError": "regsearch._errors",
    "ConfigError": "regsearch._errors",
    "PluginError": "regsearch._errors",
    "DataError": "regsearch._errors",
    "StorageError": "regsearch._errors",
    "StudyError": "regsearch._errors",
    "TrialError": "regsearch._errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from regsearch._confirm import confirm
    from regsearch._errors import (
        ConfigError,
        DataError,
        PluginError,
        RegsearchError,
        StorageError,
        StudyError,
        TrialError,
    )
    from regsearch._options import Names
    from regsearch._ranges import Range, parse_range
    from regsearch._records import leaderboard
    from regsearch._registry import RegularizerInfo, RegularizerRegistry, default_registry, register
    from regsearch._regularizer import LoopState, Regularizer, TrialContext
    from regsearch._spec import StudySpec, spec_from_dict
    from regsearch._study import optimize
    from regsearch._study_file import load_study
    from regsearch.data._tensors import TensorData
    from regsearch.data.images import images_from_dataset, load_images


_SUBMODULES = ("testing", "surgery", "models", "data")
"""Public submodules reachable as attributes (`regsearch.testing.contract_tests`) without importing them first."""


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"regsearch.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'regsearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
