"""Calling a model or plugin factory with a study file's options, a bad option named by its key."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, create_model

from regsearch._errors import ConfigError, did_you_mean
from regsearch._validation_errors import error_line


def _own_text(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Names = Annotated[tuple[str, ...], BeforeValidator(_own_text), Field(strict=False)]
"""An option that is a list of names (module types, name patterns); one name alone is a list of one."""


def checked_options(factory: Any, options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`options` checked against the factory's annotations (`per_site: bool`, `position: Literal[...]`, `Names`,
    `Annotated[float, Field(ge=0)]`): the constraints are declared once, in the signature, and a bad value is one
    line naming its key. Options annotated `Any` (ranges a plugin parses itself) pass through as given."""
    import inspect

    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except (NameError, TypeError):  # annotations that do not resolve: the factory checks its own options
        return dict(options)
    fields = {key: (hints[key], ...) for key in options if key in hints and hints[key] is not Any
              and key in inspect.signature(target).parameters}
    if not fields:
        return dict(options)
    model = create_model("Options", __config__=ConfigDict(strict=True, arbitrary_types_allowed=True), **fields)
    try:
        checked = model(**{key: options[key] for key in fields})
    except ValidationError as exc:
        raise ConfigError(error_line(exc, model, where)) from None
    return {**options, **{key: getattr(checked, key) for key in fields}}


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
