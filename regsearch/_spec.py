"""The study's typed, frozen spec: pydantic models whose errors read as one line (key, value, what was expected).

Every value is checked once, here, so that a mistake is reported before any training starts. Reading study
files and `--set` overrides live in `regsearch._study_file`.
"""

from __future__ import annotations

import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError, model_validator

from regsearch._errors import ConfigError, did_you_mean, unknown_name


class _Invalid(ValueError):
    """A bad value said without its key: the key is put in front where the value's place is known.

    `key` names a part of the value (`log` of a range), appended to the value's own key.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Range:
    """A hyperparameter: fixed when low == high, else searched in [low, high] (on a log scale if log)."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def suggest(self, trial: Any, name: str) -> float | int:
        """The value for this trial: suggested on the trial unless the range is a single value."""
        if self.fixed:
            return int(self.low) if self.integer else self.low
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def __str__(self) -> str:
        if self.fixed:
            return f"{self.low:g}"
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


def parse_range(
    value: Any,
    where: str,
    *,
    log: bool = False,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    maximum_open: bool = False,
) -> Range:
    """Read a number (fixed) or [low, high] / {low, high, log} (searched) and check its bounds.

    `where` names the value in error messages, e.g. "regularizers.l1.strength".
    """
    try:
        return _read_range(value, log=log, integer=integer, minimum=minimum, maximum=maximum,
                           maximum_open=maximum_open)
    except _Invalid as exc:
        raise ConfigError(f"{where}{'.' + exc.key if exc.key else ''}: {exc}") from None


def _read_range(value: Any, *, log: bool = False, integer: bool = False, minimum: float | None = None,
                maximum: float | None = None, maximum_open: bool = False) -> Range:
    if isinstance(value, Range):
        low, high, log = value.low, value.high, value.log
    elif isinstance(value, Mapping):
        extra = set(value) - {"low", "high", "log"}
        if extra or not {"low", "high"} <= set(value):
            raise _Invalid(f"expected a number, [low, high] or {{low, high, log}}; got {dict(value)!r}")
        low, high, log = value["low"], value["high"], value.get("log", log)
    elif isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise _Invalid(f"a range is [low, high]; got {list(value)!r}")
        low, high = value
    else:
        low = high = value
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise _Invalid(f"expected a number or [low, high] of numbers; got {value!r}")
        if integer and bound != int(bound):
            raise _Invalid(f"expected whole numbers; got {value!r}")
    if not isinstance(log, bool):
        raise _Invalid(f"expected true or false; got {log!r}", key="log")
    if low > high:
        raise _Invalid(f"low must not exceed high; got [{low}, {high}]")
    if log and low <= 0:
        raise _Invalid(f"a log-scale range must be above 0; got [{low}, {high}]")
    if minimum is not None and low < minimum:
        raise _Invalid(f"must be >= {minimum}; got {value!r}")
    if maximum is not None and (high > maximum or (maximum_open and high == maximum)):
        bracket = ")" if maximum_open else "]"
        lower = "" if minimum is None else f"[{minimum}, "
        raise _Invalid(f"must be in {lower or '(-inf, '}{maximum}{bracket}; got {value!r}")
    return Range(float(low), float(high), log=log and low != high, integer=integer)


def _searched(**checks: Any) -> PlainValidator:
    """A Range field's validator: what parse_range reads, with `checks` (log, minimum, ...) as its defaults."""
    return PlainValidator(lambda value: _read_range(value, **checks))


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value  # YAML's 2.0 counts as 2


Whole = Annotated[int, BeforeValidator(_whole)]


def _on_off(value: Any) -> Any:
    """A study file writes `enabled: true` / `false` (or leaves it out to search it); the spec holds on / off."""
    value = "on" if value is True else "off" if value is False else value
    if value not in ("search", "on", "off"):
        raise _Invalid(f"expected search, true or false; got {value!r}")
    return value


def _registered_name(value: Any) -> Any:
    """A name the MLflow Model Registry takes: checked here, before training, not refused after it."""
    if value is not None and (not isinstance(value, str) or not value.strip() or "/" in value or ":" in value
                              or value == "." or value.startswith("..")):
        raise _Invalid(f"a model name without '/' or ':' (and not '.' or starting with '..'); got {value!r}")
    return value


_GROUP = re.compile(r"^[a-z][a-z0-9_]*$")


def _group_name(value: Any) -> Any:
    if value is not None and (not isinstance(value, str) or not _GROUP.match(value)):
        raise _Invalid(f"a group name of lower-case letters, digits and '_'; got {value!r}")
    return value


class _Spec(BaseModel):
    """A part of a study: frozen, unknown keys refused, no silent conversions ('5' is not a number)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False, defer_build=True)
    not_from_file: ClassVar[tuple[str, ...]] = ()
    """Fields filled by the loader itself, never written in a study file."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_error_line(exc, type(self), "")) from None

    # Marks this __init__ as one that only validates (as pydantic's RootModel does), so that a nested part is built
    # without it and its error keeps its full path (`training.epochs`) instead of becoming the parent's one line.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> Self:
        """Validate `data`; an error names its key under `where` (`search.pruner.name`)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_error_line(exc, cls, where)) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, checked like the original (`model_copy` would take any value unchecked)."""
        return type(self)(**{**dict(self), **changes})


class DataSpec(_Spec):
    """Which data, and how the training data is split into training and validation."""

    name: Literal["digits", "cifar10"] = "digits"
    val_fraction: Annotated[float, Field(ge=0.01, le=0.9)] = 0.2
    train_size: Annotated[Whole | None, Field(ge=10)] = None


class ModelSpec(_Spec):
    """A built-in model by name; the other keys are the model's own options."""

    name: str = "mlp"
    options: Mapping[Any, Any] = Field(default_factory=dict)  # checked by the model factory (call_with_options)


class TrainingSpec(_Spec):
    """The training recipe every trial shares (ranges here are searched like regularizer parameters)."""

    epochs: Annotated[Whole, Field(ge=1)] = 30
    batch_size: Annotated[Whole, Field(ge=1)] = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[Range, _searched(log=True, minimum=0.0)] = Range(0.01, 0.3, log=True)
    momentum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    schedule: Literal["constant", "cosine", "onecycle"] = "onecycle"
    label_smoothing: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    eval_batch_size: Annotated[Whole, Field(ge=1)] = 1024
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """bfloat16 autocast (weights stay float32) or float32; auto: bfloat16 on GPUs with native bfloat16 (Ampere on)
    and, where a step is big enough to gain, on CPUs with it (AVX512-BF16, AMX)."""


class SamplerSpec(_Spec):
    name: Literal["tpe", "random"] = "tpe"
    n_startup_trials: Annotated[Whole, Field(ge=0)] = 8


class PrunerSpec(_Spec):
    name: Literal["none", "median", "hyperband", "successive_halving"] = "median"
    n_startup_trials: Annotated[Whole, Field(ge=0)] = 5
    n_warmup_steps: Annotated[Whole, Field(ge=0)] = 5
    min_resource: Annotated[Whole, Field(ge=1)] = 2
    reduction_factor: Annotated[Whole, Field(ge=2)] = 3


class SearchSpec(_Spec):
    n_trials: Annotated[Whole, Field(ge=1)] = 20
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    max_consecutive_failures: Annotated[Whole, Field(ge=1)] = 5
    baseline: bool = True
    """Start a new study with an unregularized baseline trial (every regularizer off, no label smoothing)."""
    first_trial: Mapping[str, Any] = Field(default_factory=dict)
    """Parameters of a sound recipe tried first (after the baseline; enqueued once, when the study is new)."""
    heartbeat_interval: Annotated[Whole, Field(ge=1)] = 30
    """Seconds between a running trial's heartbeats (RDB storages)."""
    grace_period: Annotated[Whole, Field(ge=2)] = 90
    """Seconds without a heartbeat after which a trial counts as dead, is failed and queued again."""
    objective: Literal["val_acc", "pareto"] = "val_acc"
    """val_acc: maximize it; pareto: maximize val_acc and minimize gap_acc (no pruning: Optuna cannot)."""
    max_gap: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    """Only trials with gap_acc <= max_gap count as best (an Optuna constraint); None: no constraint."""
    register_model: Annotated[str | None, BeforeValidator(_registered_name)] = None
    """Register the logged best model under this name in the MLflow Model Registry (a new version per study run)."""

    @model_validator(mode="after")
    def _one_objective(self) -> Self:
        if self.objective == "pareto" and self.max_gap is not None:
            raise ConfigError(f"max_gap {self.max_gap:g} and objective pareto do not combine: the Pareto front already "
                              f"holds the best val_acc for every gap (drop one of the two)")
        return self


class RegularizerSpec(_Spec):
    """One regularizer of the study: its registry name, on/off mode and its plugin options."""

    name: str
    enabled: Annotated[Literal["search", "on", "off"], BeforeValidator(_on_off)] = "search"
    options: Mapping[Any, Any] = Field(default_factory=dict)  # checked by the plugin (call_with_options)
    choice: Annotated[str | None, BeforeValidator(_group_name)] = None
    """A group name: of the regularizers sharing it, at most one is on in a trial (`choice.<group>` picks it)."""

    @model_validator(mode="after")
    def _choice_switches(self) -> Self:
        if self.enabled == "on" and self.choice is not None:
            raise _Invalid(f"enabled: true contradicts choice: {self.choice} (the group's choice switches its "
                           f"members; drop one of the two)")
        return self


class StudySpec(_Spec):
    """A whole study file, validated."""

    not_from_file: ClassVar[tuple[str, ...]] = ("name", "source")
    name: str
    description: str = ""
    seed: Whole = 0
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    regularizers: Annotated[tuple[RegularizerSpec, ...], Field(strict=False)] = ()
    plugins: Annotated[tuple[str, ...], Field(strict=False)] = ()
    source: str = "<python>"


_UNKNOWN_KEY = ("extra_forbidden", "invalid_key")  # invalid_key: a key that is no string (YAML's `1:`)

# What a pydantic error type expects, in the words of a study file.
_EXPECTED = {"int_type": "a whole number", "float_type": "a number", "finite_number": "a number",
             "bool_type": "true or false", "string_type": "a string", "dict_type": "a mapping",
             "mapping_type": "a mapping", "model_type": "a mapping of keys", "tuple_type": "a list"}


def _model_at(cls: type[_Spec], keys: list[str]) -> type[_Spec] | None:
    """The model holding the last of `keys` (a path of fields from `cls`), None when it is no model's field."""
    for key in keys:
        field = cls.model_fields.get(key)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, _Spec)):
            return None
        cls = field.annotation
    return cls


def _known_keys(cls: type[_Spec]) -> list[str]:
    return sorted(k for k in cls.model_fields if k not in cls.not_from_file)


def _error_parts(exc: ValidationError, cls: type[_Spec]) -> tuple[list[str] | None, str]:
    """The first of pydantic's errors in this project's words: (the key's path, what is wrong and what was got).

    The path is None where the message already says what it is about.
    """
    errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] not in _UNKNOWN_KEY)  # typos first
    error = errors[0]
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    keys = [str(k) for k in error["loc"] if k != "[key]"]
    cause = ctx.get("error")
    if isinstance(cause, ConfigError):
        return None, str(cause)
    if isinstance(cause, _Invalid):
        return keys + ([cause.key] if cause.key else []), str(cause)
    owner = _model_at(cls, keys[:-1])
    if kind in _UNKNOWN_KEY and owner is not None:
        known = _known_keys(owner)
        return keys, f"unknown key{did_you_mean(keys[-1], known)}; known: {', '.join(known)}"
    if kind == "literal_error" and owner is not None:
        shown = value if isinstance(value, str) else repr(value)
        choices = typing.get_args(owner.model_fields[keys[-1]].annotation)
        return keys, unknown_name("value", str(shown), [str(c) for c in choices])
    for name, sign in (("ge", ">="), ("le", "<=")):
        if name in ctx:  # a float field shows the number as read (2 -> 2.0)
            got = float(value) if isinstance(ctx[name], float) and isinstance(value, int) else value
            return keys, f"must be {sign} {ctx[name]}; got {got!r}"
    expected = _EXPECTED.get(kind)
    if expected:
        return keys, f"expected {expected}; got {value!r}"
    return keys, f"{error['msg'][:1].lower()}{error['msg'][1:]}; got {value!r}"


def _error_line(exc: ValidationError, cls: type[_Spec], where: str) -> str:
    """One line for a failed validation of `cls`: `where.key.path: what is wrong; got value`."""
    keys, text = _error_parts(exc, cls)
    if keys is None:
        return text
    path = ".".join([where, *keys] if where else keys)
    return f"{path}: {text}" if path else text


def search_value(key: str, value: Any, where: str) -> Any:
    """`value` for the study-file key `search.<key>`, checked as the file's would be (for options given elsewhere).

    `where` names it in the error (`--max-gap`, `max_gap`).
    """
    try:
        return getattr(SearchSpec.model_validate({key: value}), key)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_error_parts(exc, SearchSpec)[1]}") from None


def _model(raw: Any) -> ModelSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"model: expected a mapping with a 'name'; got {raw!r}")
    options = dict(raw)
    return ModelSpec.from_mapping({"name": options.pop("name", "mlp"), "options": options}, "model")


def _regularizers(raw: Any) -> tuple[RegularizerSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"regularizers: expected a mapping of plugin name to its options; got {raw!r}")
    specs = []
    for name, options in raw.items():
        where = f"regularizers.{name}"
        options = {} if options is None else options
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}: expected a mapping of the plugin's options (or {{}}); got {options!r}")
        options = dict(options)
        given = {key: options.pop(key) for key in ("enabled", "choice") if key in options}
        specs.append(RegularizerSpec.from_mapping({"name": str(name), "options": options, **given}, where))
    return tuple(specs)


def _plugins(raw: Any, source: str) -> tuple[str, ...]:
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)) or not all(isinstance(p, str) for p in raw):
        raise ConfigError(f"plugins: expected a list of plugin file paths; got {raw!r}")
    base = Path(source).parent if source != "<python>" else Path.cwd()
    return tuple(os.path.abspath(base / p) for p in raw)  # links are resolved (and loops reported) on load


def spec_from_dict(raw: Any, *, name: str, source: str = "<python>") -> StudySpec:
    """Validate a study given as a mapping (the parsed YAML of a study file)."""
    if raw is None:
        raise ConfigError(f"{source}: the study file is empty")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a study file is a mapping of keys; got a {type(raw).__name__}")
    raw = dict(raw)
    if isinstance(raw.get("training"), Mapping) and "augment" in raw["training"]:
        raise ConfigError("training.augment: augmentation is the regularizer 'augment' now; write "
                          "`augment: {enabled: true}` under regularizers (or leave out `enabled` to search it)")
    for key in StudySpec.not_from_file:
        if key in raw:
            known = _known_keys(StudySpec)
            raise ConfigError(f"{key}: unknown key{did_you_mean(key, known)}; known: {', '.join(known)}")
    given = {"model": _model(raw.pop("model", {}) or {}),
             "regularizers": _regularizers(raw.pop("regularizers", None)),
             "plugins": _plugins(raw.pop("plugins", ()) or (), source)}
    return StudySpec.from_mapping({**raw, **given, "name": name, "source": source}, "")


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
