"""Study files: YAML validated into a frozen, typed StudySpec.

Every value is checked once, here, so that a mistake is reported before any training starts, with the key
that holds it, what was got and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from regsearch._errors import ConfigError, did_you_mean, unknown_name

_PACKAGE_STUDIES = Path(__file__).resolve().parent / "studies"
_CHECKOUT_STUDIES = Path(__file__).resolve().parent.parent / "studies"


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
    if isinstance(value, Range):
        low, high, log = value.low, value.high, value.log
    elif isinstance(value, Mapping):
        extra = set(value) - {"low", "high", "log"}
        if extra or not {"low", "high"} <= set(value):
            raise ConfigError(f"{where}: expected a number, [low, high] or {{low, high, log}}; got {dict(value)!r}")
        low, high, log = value["low"], value["high"], value.get("log", log)
    elif isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{where}: a range is [low, high]; got {list(value)!r}")
        low, high = value
    else:
        low = high = value
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise ConfigError(f"{where}: expected a number or [low, high] of numbers; got {value!r}")
        if integer and bound != int(bound):
            raise ConfigError(f"{where}: expected whole numbers; got {value!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false; got {log!r}")
    if low > high:
        raise ConfigError(f"{where}: low must not exceed high; got [{low}, {high}]")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log-scale range must be above 0; got [{low}, {high}]")
    if minimum is not None and low < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}; got {value!r}")
    if maximum is not None and (high > maximum or (maximum_open and high == maximum)):
        bracket = ")" if maximum_open else "]"
        lower = "" if minimum is None else f"[{minimum}, "
        raise ConfigError(f"{where}: must be in {lower or '(-inf, '}{maximum}{bracket}; got {value!r}")
    return Range(float(low), float(high), log=log and not low == high, integer=integer)


def _range_field(default: Range, **checks: Any) -> Any:
    return field(default=default, metadata={"range": checks})


def _check(**checks: Any) -> Any:
    return {"check": checks}


@dataclass(frozen=True)
class DataSpec:
    """Which data, and how the training data is split into training and validation."""

    name: Literal["digits", "cifar10"] = "digits"
    val_fraction: float = field(default=0.2, metadata=_check(minimum=0.01, maximum=0.9))
    train_size: int | None = field(default=None, metadata=_check(minimum=10))


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model by name; the other keys are the model's own options."""

    name: str = "mlp"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSpec:
    """The training recipe every trial shares (ranges here are searched like regularizer parameters)."""

    epochs: int = field(default=30, metadata=_check(minimum=1))
    batch_size: int = field(default=64, metadata=_check(minimum=1))
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Range = _range_field(Range(0.01, 0.3, log=True), log=True, minimum=0.0)
    momentum: float = field(default=0.9, metadata=_check(minimum=0.0, maximum=1.0))
    schedule: Literal["constant", "cosine", "onecycle"] = "onecycle"
    label_smoothing: float = field(default=0.0, metadata=_check(minimum=0.0, maximum=0.5))
    eval_batch_size: int = field(default=1024, metadata=_check(minimum=1))
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """bfloat16 autocast (weights stay float32) or float32; auto: bfloat16 on GPUs with native bfloat16 (Ampere on)
    and, where a step is big enough to gain, on CPUs with it (AVX512-BF16, AMX)."""


@dataclass(frozen=True)
class SamplerSpec:
    name: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = field(default=8, metadata=_check(minimum=0))


@dataclass(frozen=True)
class PrunerSpec:
    name: Literal["none", "median", "hyperband", "successive_halving"] = "median"
    n_startup_trials: int = field(default=5, metadata=_check(minimum=0))
    n_warmup_steps: int = field(default=5, metadata=_check(minimum=0))
    min_resource: int = field(default=2, metadata=_check(minimum=1))
    reduction_factor: int = field(default=3, metadata=_check(minimum=2))


@dataclass(frozen=True)
class SearchSpec:
    n_trials: int = field(default=20, metadata=_check(minimum=1))
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    max_consecutive_failures: int = field(default=5, metadata=_check(minimum=1))
    baseline: bool = True
    """Start a new study with an unregularized baseline trial (every regularizer off, no label smoothing)."""
    first_trial: Mapping[str, Any] = field(default_factory=dict)
    """Parameters of a sound recipe tried first (after the baseline; enqueued once, when the study is new)."""
    heartbeat_interval: int = field(default=30, metadata=_check(minimum=1))
    """Seconds between a running trial's heartbeats (RDB storages)."""
    grace_period: int = field(default=90, metadata=_check(minimum=2))
    """Seconds without a heartbeat after which a trial counts as dead, is failed and queued again."""
    objective: Literal["val_acc", "pareto"] = "val_acc"
    """val_acc: maximize it; pareto: maximize val_acc and minimize gap_acc (no pruning: Optuna cannot)."""
    max_gap: float | None = field(default=None, metadata=_check(minimum=0.0, maximum=1.0))
    """Only trials with gap_acc <= max_gap count as best (an Optuna constraint); None: no constraint."""

    def __post_init__(self) -> None:
        if self.objective == "pareto" and self.max_gap is not None:
            raise ConfigError(f"max_gap {self.max_gap:g} and objective pareto do not combine: the Pareto front already "
                              f"holds the best val_acc for every gap (drop one of the two)")


@dataclass(frozen=True)
class RegularizerSpec:
    """One regularizer of the study: its registry name, on/off mode and its plugin options."""

    name: str
    enabled: Literal["search", "on", "off"] = "search"
    options: Mapping[str, Any] = field(default_factory=dict)
    choice: str | None = None
    """A group name: of the regularizers sharing it, at most one is on in a trial (`choice.<group>` picks it)."""


@dataclass(frozen=True)
class StudySpec:
    """A whole study file, validated."""

    name: str
    description: str = ""
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    regularizers: tuple[RegularizerSpec, ...] = ()
    plugins: tuple[str, ...] = ()
    source: str = "<python>"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, where: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where, meta)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            shown = value if isinstance(value, str) else repr(value)
            raise ConfigError(f"{where}: {unknown_name('value', str(shown), [str(c) for c in choices])}")
        return value
    if tp is Range:
        return parse_range(value, where, **meta.get("range", {}))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of keys; got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false; got {value!r}")
        return value
    if typing.get_origin(tp) is Mapping or tp is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping; got {value!r}")
        return dict(value)
    if tp in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and tp is int and value != int(value):
            ok = False
        if not ok or not math.isfinite(value):
            raise ConfigError(f"{where}: expected {_type_name(tp)}; got {value!r}")
        value = tp(value)
        check = meta.get("check", {})
        if "minimum" in check and value < check["minimum"]:
            raise ConfigError(f"{where}: must be >= {check['minimum']}; got {value!r}")
        if "maximum" in check and value > check["maximum"]:
            raise ConfigError(f"{where}: must be <= {check['maximum']}; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string; got {value!r}")
        return value
    raise TypeError(f"no conversion for {tp!r}")  # a bug in this module, not bad input


def search_value(key: str, value: Any, where: str) -> Any:
    """`value` for the study-file key `search.<key>`, checked as the file's would be (for options given elsewhere).

    `where` names it in the error (`--max-gap`, `max_gap`).
    """
    meta = {f.name: f.metadata for f in dataclasses.fields(SearchSpec)}
    return _convert(typing.get_type_hints(SearchSpec)[key], value, where, meta[key])


# Fields filled by the loader itself, never written in a study file.
_NOT_FROM_FILE = {StudySpec: ("name", "source"), ModelSpec: ("options",), RegularizerSpec: ("options",)}


def _build(cls: type, data: Mapping[str, Any], where: str, given: Mapping[str, Any] | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_FROM_FILE.get(cls, ())}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key{did_you_mean(str(key), fields)}; "
                              f"known: {', '.join(sorted(fields))}")
    values = {k: _convert(hints[k], v, f"{prefix}{k}", fields[k].metadata) for k, v in data.items()}
    return cls(**values, **(given or {}))


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
        enabled = options.pop("enabled", "search")
        enabled = {True: "on", False: "off"}.get(enabled, enabled)
        if enabled not in ("search", "on", "off"):
            raise ConfigError(f"{where}.enabled: expected search, true or false; got {enabled!r}")
        choice = options.pop("choice", None)
        if choice is not None:
            if not isinstance(choice, str) or not _GROUP.match(choice):
                raise ConfigError(f"{where}.choice: a group name of lower-case letters, digits and '_'; got {choice!r}")
            if enabled == "on":
                raise ConfigError(f"{where}: enabled: true contradicts choice: {choice} (the group's choice switches "
                                  f"its members; drop one of the two)")
        specs.append(RegularizerSpec(name=str(name), enabled=enabled, options=options, choice=choice))
    return tuple(specs)


_GROUP = re.compile(r"^[a-z][a-z0-9_]*$")


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
    model_raw = raw.pop("model", {}) or {}
    if not isinstance(model_raw, Mapping):
        raise ConfigError(f"model: expected a mapping with a 'name'; got {model_raw!r}")
    model_raw = dict(model_raw)
    model = ModelSpec(name=_convert(str, model_raw.pop("name", "mlp"), "model.name", {}), options=model_raw)
    regularizers = _regularizers(raw.pop("regularizers", None))
    plugins = raw.pop("plugins", ()) or ()
    if isinstance(plugins, str) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins: expected a list of plugin file paths; got {plugins!r}")
    base = Path(source).parent if source != "<python>" else Path.cwd()
    plugins = tuple(os.path.abspath(base / p) for p in plugins)  # links are resolved (and loops reported) on load
    spec = _build(StudySpec, raw, "", given={"name": name})
    return dataclasses.replace(spec, model=model, regularizers=regularizers, plugins=plugins, source=source)


def apply_overrides(raw: Any, overrides: Mapping[str, str] | list[tuple[str, str]]) -> Any:
    """Set dotted keys (`training.epochs=5`) in a parsed study file; values are read as YAML scalars."""
    raw = dict(raw or {})
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for key, text in items:
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"--set {key}={text}: the key must be dotted names like training.epochs")
        try:
            value = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}={text}: the value is not a YAML scalar") from None
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


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


def study_dirs() -> list[Path]:
    """Where `--study NAME` looks: the installed package's studies, then a source checkout's."""
    return [d for d in (_PACKAGE_STUDIES, _CHECKOUT_STUDIES) if d.is_dir()]


def available_studies() -> dict[str, Path]:
    """Study name -> file, for every shipped study."""
    found: dict[str, Path] = {}
    for d in study_dirs():
        for path in sorted(d.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def resolve_study(name_or_path: str) -> Path:
    """A shipped study's file by name, or the path as given."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        if not path.is_file():
            raise ConfigError(f"study file {name_or_path} does not exist")
        return path
    known = available_studies()
    if name_or_path not in known:
        raise ConfigError(unknown_name("study", name_or_path, known))
    return known[name_or_path]


class _StudyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last silently)."""


def _unique_keys(loader: _StudyLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StudyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def read_study_file(path: Path) -> Any:
    """The parsed YAML of a study file, loaded safely (no object construction)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read study file {path}: {exc}") from None
    try:
        return yaml.load(text, Loader=_StudyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None


def load_study(name_or_path: str, overrides: Mapping[str, str] | list[tuple[str, str]] = ()) -> StudySpec:
    """Find, read, override and validate a study file."""
    path = resolve_study(name_or_path)
    raw = read_study_file(path)
    if overrides:
        if raw is None:
            raise ConfigError(f"{path}: the study file is empty")
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: a study file is a mapping of keys; got a {type(raw).__name__}")
        raw = apply_overrides(raw, overrides)
    try:
        return spec_from_dict(raw, name=path.stem, source=str(path))
    except ConfigError as exc:
        text = str(exc)
        items = overrides.items() if isinstance(overrides, Mapping) else overrides
        for key, value in reversed(list(items)):  # a value given with --set is named as the user typed it
            if text.startswith((f"{key}:", f"{key}.")):
                raise ConfigError(f"--set {key}={value}: {text}") from None
        raise ConfigError(f"{path.name}: {text}") from None


def describe(path: Path) -> str:
    """The one-line description of a study file, '' when it has none or cannot be read."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return ""
    return str(raw.get("description", "")).strip().splitlines()[0] if isinstance(raw, Mapping) and raw.get(
        "description") else ""
