"""Calling a model or plugin factory with a study file's options, a bad option named by its key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from regsearch._errors import ConfigError, did_you_mean


def call_with_options(factory: Any, options: Mapping[str, Any], where: str, what: str) -> Any:
    """Call `factory(**options)` with the options of a study file, naming the key of a bad one."""
    import inspect

    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    known = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and n not in ("input_shape", "num_classes")]
    for key in options:
        if key not in known and not takes_any:
            raise ConfigError(f"{where}.{key}: unknown option{did_you_mean(str(key), known)}; "
                              f"{what} takes: {', '.join(known) or 'none'}")
    try:
        return factory(**options)
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(exc).startswith(where) else f"{where}.{exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
