"""Pydantic's validation errors in a study file's words: one line naming the key, what it takes, what it got.

The study file's parts (`_spec`) and the options of plugins and models (`_options`) both report through here, so
a bad value reads the same wherever it was written.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel, ValidationError

from regsearch._errors import ConfigError, did_you_mean, unknown_name
from regsearch._ranges import Invalid

UNKNOWN_KEY = ("extra_forbidden", "invalid_key")  # invalid_key: a key that is no string (YAML's `1:`)

# What a pydantic error type expects, in the words of a study file.
EXPECTED = {"int_type": "a whole number", "float_type": "a number", "finite_number": "a number",
             "bool_type": "true or false", "string_type": "a string", "dict_type": "a mapping",
             "mapping_type": "a mapping", "model_type": "a mapping of keys", "tuple_type": "a list"}


def model_at(cls: type[BaseModel], keys: list[str]) -> type[BaseModel] | None:
    """The model holding the last of `keys` (a path of fields from `cls`), None when it is no model's field."""
    for key in keys:
        field = cls.model_fields.get(key)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls


def known_keys(cls: type[BaseModel]) -> list[str]:
    return sorted(k for k in cls.model_fields if k not in getattr(cls, "not_from_file", ()))


def error_parts(exc: ValidationError, cls: type[BaseModel]) -> tuple[list[str] | None, str]:
    """The first of pydantic's errors in this project's words: (the key's path, what is wrong and what was got).

    The path is None where the message already says what it is about.
    """
    errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] not in UNKNOWN_KEY)  # typos first
    error = errors[0]
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    keys = [str(k) for k in error["loc"] if k != "[key]"]
    cause = ctx.get("error")
    if isinstance(cause, ConfigError):
        return None, str(cause)
    if isinstance(cause, Invalid):
        return keys + ([cause.key] if cause.key else []), str(cause)
    owner = model_at(cls, keys[:-1])
    if kind in UNKNOWN_KEY and owner is not None:
        known = known_keys(owner)
        return keys, f"unknown key{did_you_mean(keys[-1], known)}; known: {', '.join(known)}"
    if kind == "literal_error" and owner is not None:
        shown = value if isinstance(value, str) else repr(value)
        choices = typing.get_args(owner.model_fields[keys[-1]].annotation)
        return keys, unknown_name("value", str(shown), [str(c) for c in choices])
    for name, sign in (("ge", ">="), ("le", "<=")):
        if name in ctx:  # a float field shows the number as read (2 -> 2.0)
            got = float(value) if isinstance(ctx[name], float) and isinstance(value, int) else value
            return keys, f"must be {sign} {ctx[name]}; got {got!r}"
    expected = EXPECTED.get(kind)
    if expected:
        return keys, f"expected {expected}; got {value!r}"
    return keys, f"{error['msg'][:1].lower()}{error['msg'][1:]}; got {value!r}"


def error_line(exc: ValidationError, cls: type[BaseModel], where: str) -> str:
    """One line for a failed validation of `cls`: `where.key.path: what is wrong; got value`."""
    keys, text = error_parts(exc, cls)
    if keys is None:
        return text
    path = ".".join([where, *keys] if where else keys)
    return f"{path}: {text}" if path else text
