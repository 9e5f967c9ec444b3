"""The study's typed, frozen spec: pydantic models whose errors read as one line (key, value, what was expected).

Every value is checked once, here, so that a mistake is reported before any training starts. Reading study
files and `--set` overrides live in `regsearch._study_file`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError, model_validator

from regsearch._errors import ConfigError, did_you_mean
from regsearch._ranges import Invalid, Range, read_range
from regsearch._searched_keys import MODEL_OWN_KEYS, search_spaces
from regsearch._validation_errors import error_line, error_parts, known_keys


def _searched(**checks: Any) -> PlainValidator:
    """A Range field's validator: what parse_range reads, with `checks` (log, minimum, ...) as its defaults."""
    return PlainValidator(lambda value: read_range(value, **checks))


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value  # YAML's 2.0 counts as 2


Whole = Annotated[int, BeforeValidator(_whole)]


def _on_off(value: Any) -> Any:
    """A study file writes `enabled: true` / `false` (or leaves it out to search it); the spec holds on / off."""
    value = "on" if value is True else "off" if value is False else value
    if value not in ("search", "on", "off"):
        raise Invalid(f"expected search, true or false; got {value!r}")
    return value


def _registered_name(value: Any) -> Any:
    """A name the MLflow Model Registry takes: checked here, before training, not refused after it."""
    if value is not None and (not isinstance(value, str) or not value.strip() or "/" in value or ":" in value
                              or value == "." or value.startswith("..")):
        raise Invalid(f"a model name without '/' or ':' (and not '.' or starting with '..'); got {value!r}")
    return value


_GROUP = re.compile(r"^[a-z][a-z0-9_]*$")


def _group_name(value: Any) -> Any:
    if value is not None and (not isinstance(value, str) or not _GROUP.match(value)):
        raise Invalid(f"a group name of lower-case letters, digits and '_'; got {value!r}")
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
            raise ConfigError(error_line(exc, type(self), "")) from None

    # Marks this __init__ as one that only validates (as pydantic's RootModel does), so that a nested part is built
    # without it and its error keeps its full path (`training.epochs`) instead of becoming the parent's one line.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> Self:
        """Validate `data`; an error names its key under `where` (`search.pruner.name`)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(error_line(exc, cls, where)) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, checked like the original (`model_copy` would take any value unchecked)."""
        return type(self)(**{**dict(self), **changes})


def _column_names(value: Any) -> Any:
    """A column named by a number (`--set data.target=1` reads as YAML's 1) is the column of that header."""
    def named(v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    return [named(v) for v in value] if isinstance(value, (list, tuple)) else named(value)


_Column = Annotated[str | None, BeforeValidator(_column_names)]
_Columns = Annotated[tuple[str, ...] | None, Field(strict=False), BeforeValidator(_column_names)]


class DataSpec(_Spec):
    """Which data, and how the training data is split into training and validation.

    `table` is the user's own CSV/TSV/Parquet file (`regsearch.data.table.load_table`), `images` the user's own
    images (`regsearch.data.images.load_images`: a folder of class subfolders, or a CSV/TSV of paths and labels);
    their keys mean nothing for the built-in datasets. Their paths are absolute once read (see `_data_paths`).
    """

    table_keys: ClassVar[tuple[str, ...]] = ("path", "target", "test_path", "features", "categorical", "id_columns",
                                             "group_repeats")
    image_keys: ClassVar[tuple[str, ...]] = ("path", "target", "test_path", "group_repeats", "image_size", "channels",
                                             "path_column", "in_memory")
    name: Literal["digits", "cifar10", "table", "images"] = "digits"
    val_fraction: Annotated[float, Field(ge=0.01, le=0.9)] = 0.2
    train_size: Annotated[Whole | None, Field(ge=10)] = None
    path: Annotated[str | None, Field(min_length=1)] = None
    """The table's file (training rows, split into training and validation); for images, their folder or CSV."""
    target: _Column = None
    """The column holding the class labels (images in a CSV: default `label`)."""
    test_path: Annotated[str | None, Field(min_length=1)] = None
    """A second file with the same columns, the test split; without it the study reports validation accuracy."""
    features: _Columns = None
    """The input columns (default: every column but the target and id_columns)."""
    categorical: _Columns = None
    """Columns that are categories (default: those whose values are not numbers)."""
    id_columns: _Columns = None
    """Columns left out of the inputs (row ids, names)."""
    group_repeats: bool | None = None
    """Keep rows with the same inputs (images: byte-identical files) on one side of the validation split (and of
    confirmation folds)."""
    image_size: Annotated[Whole | None, Field(ge=8, le=1024)] = None
    """Images: the side of the square each is resized to (shorter side to this size, then the centre cut out)."""
    channels: Literal[1, 3] | None = None
    """Images: 3 (RGB, default) or 1 (greyscale)."""
    path_column: _Column = None
    """Images in a CSV/TSV: the column of file paths (relative to the CSV's folder; default `path`)."""
    in_memory: bool | None = None
    """Images: hold the pixels in memory (true) or read batches from the cache file (false); default: in memory
    when they take at most a fifth of the memory available."""

    @model_validator(mode="after")
    def _keys_go_with_their_data(self) -> Self:
        if self.name == "table":
            lacking = [key for key in ("path", "target") if getattr(self, key) is None]
            if lacking:
                raise Invalid("data.name table needs the table's file and its label column: give them in the study "
                               "file, or with --set data.path=FILE --set data.target=COLUMN", lacking[0])
        own = {"table": self.table_keys, "images": self.image_keys}.get(self.name, ())
        given = [key for key in (*self.table_keys, *self.image_keys) if getattr(self, key) is not None
                 and key not in own]
        if given:
            key = given[0]
            if key in self.table_keys:
                raise Invalid(f"only a table has {key} (data.name is {self.name}); set data.name=table to read your "
                              f"own file, or drop {key}", key)
            raise Invalid(f"only images have {key} (data.name is {self.name}); set data.name=images to read your own "
                          f"images, or drop {key}", key)
        return self


class ModelSpec(_Spec):
    """A built-in model by name, or a factory's import path (`package.module:callable`); the other keys are the
    model's own options, but for `weights` and `freeze_epochs`, which any model takes."""

    own_keys: ClassVar[tuple[str, ...]] = MODEL_OWN_KEYS
    name: Annotated[str, Field(min_length=1)] = "mlp"
    options: Mapping[Any, Any] = Field(default_factory=dict)  # checked by the model factory (call_with_options)
    weights: Annotated[str | None, Field(min_length=1)] = None
    """A local state dict (.safetensors, .pth) every trial's model starts from, its classifier replaced where the
    data's classes differ; absolute once read (relative to the study file)."""
    freeze_epochs: Annotated[Whole, Field(ge=0)] = 0
    """Epochs at the start of training in which only the classifier learns (needs weights)."""

    @model_validator(mode="after")
    def _freeze_needs_weights(self) -> Self:
        if self.freeze_epochs and self.weights is None:
            raise Invalid("needs model.weights: a frozen backbone of random weights learns nothing", "freeze_epochs")
        return self


class TrainingSpec(_Spec):
    """The training recipe every trial shares (ranges here are searched like regularizer parameters)."""

    epochs: Annotated[Whole, Field(ge=1)] = 30
    steps: Annotated[Whole, Field(ge=1)] | None = None
    """A budget in optimizer steps instead of epochs: the epochs are set from the training split's size, so a table
    of 3,000 rows trains as many steps as one of 30,000. A study file gives one of the two."""
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


class ConfirmSpec(_Spec):
    """`search.confirm`: retrain the top configurations, the recipe and the baseline with fresh seeds at the end."""

    top: Annotated[Whole, Field(ge=1)] = 3
    seeds: Annotated[Whole | None, Field(ge=1)] = None
    """Fresh seeds per configuration: 3 by default, at least 2 (a spread needs two runs); with `folds`, how many
    times the cross-validation is repeated (default once)."""
    folds: Annotated[Whole | None, Field(ge=2)] = None
    """k-fold cross-validation of the finalists on the pooled training and validation rows (small data)."""
    ablate: bool = False
    """Retrain the winner without each of its regularizers, and the baseline with each alone (`regsearch.ablate`)."""

    @model_validator(mode="after")
    def _two_runs(self) -> Self:
        problem = seeds_problem(self.seeds, self.folds)
        if problem:
            raise ConfigError(f"search.confirm.seeds {problem}")
        return self


def seeds_problem(seeds: int | None, folds: int | None, folds_name: str = "folds") -> str | None:
    """The one rule for a confirmation's seeds: at least 2 without folds (a spread needs two runs), at least 1
    with them (the folds give the spread); what is wrong, or None."""
    least = 2 if folds is None else 1
    if seeds is None or seeds >= least:
        return None
    return f"must be at least {least}{f' without {folds_name} (a spread needs two runs)' if folds is None else ''}; " \
           f"got {seeds}"


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
    confirm: ConfirmSpec | None = None
    """Retrain the finalists with fresh seeds after the final report and choose on mean val_acc (None: off)."""
    reference: bool = True
    """On a table, fit HistGradientBoosting on the same training split and show it beside the winner."""
    reshuffle: bool = False
    """Each trial trains and validates on its own seeded draw of the pooled training and validation rows (same
    sizes, stratified), so the search cannot fit one split's noise; the confirmation keeps the study's split."""

    @model_validator(mode="after")
    def _ablation_has_a_winner_and_a_baseline(self) -> Self:
        if self.confirm is not None and self.confirm.ablate and (self.objective == "pareto" or not self.baseline):
            raise ConfigError("search.confirm.ablate needs " + ("a single objective: a pareto study's confirmed winner "
                              "is not what it chose" if self.objective == "pareto" else "search.baseline: true (each "
                              "regularizer is also added to the unregularized baseline alone)"))
        return self

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
            raise Invalid(f"enabled: true contradicts choice: {self.choice} (the group's choice switches its "
                           f"members; drop one of the two)")
        return self


class StudySpec(_Spec):
    """A whole study file, validated."""

    not_from_file: ClassVar[tuple[str, ...]] = ("name", "source", "searched")
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
    searched: Mapping[str, Any] = Field(default_factory=dict)
    """The searched `training.*` / `model.*` keys -> their Range or Choice; `training` and `model` hold each one's
    baseline value (mid-range, or the first choice)."""

    @model_validator(mode="after")
    def _reshuffle_keeps_no_groups(self) -> Self:
        if self.search.reshuffle and self.data.group_repeats:
            raise ConfigError(RESHUFFLE_GROUPS)
        return self


RESHUFFLE_GROUPS = ("search.reshuffle and data.group_repeats do not combine: a fresh split per trial would put copies "
                    "of a row on both sides (drop one of the two)")


def search_value(key: str, value: Any, where: str) -> Any:
    """`value` for the study-file key `search.<key>`, checked as the file's would be (for options given elsewhere).

    `where` names it in the error (`--max-gap`, `max_gap`).
    """
    try:
        return getattr(SearchSpec.model_validate({key: value}), key)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {error_parts(exc, SearchSpec)[1]}") from None


def _model(raw: Any, source: str) -> ModelSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"model: expected a mapping with a 'name'; got {raw!r}")
    options = dict(raw)
    own = {key: options.pop(key) for key in ModelSpec.own_keys if key in options}
    for key in MODEL_PATHS:
        if isinstance(own.get(key), str) and own[key]:
            own[key] = _absolute(own[key], source)
    return ModelSpec.from_mapping({"name": options.pop("name", "mlp"), "options": options, **own}, "model")


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


TABLE_PATHS = ("path", "test_path")
"""The data keys that name files: relative ones are read from the study file's folder (like `plugins`)."""
MODEL_PATHS = ("weights",)
"""The model keys that name files, read as the data's are."""


def _data_paths(raw: Any, source: str) -> Any:
    """`data` with its table paths absolute: `~` expanded, relative to the study file's folder (Python: the cwd)."""
    if not isinstance(raw, Mapping):
        return raw  # validation names what is wrong with it
    return {key: _absolute(value, source) if key in TABLE_PATHS and isinstance(value, str) and value else value
            for key, value in raw.items()}


def _absolute(path: str, source: str) -> str:
    """A path of a study file made absolute: `~` expanded, relative to the study file's folder (Python: the cwd)."""
    base = Path(source).parent if source != "<python>" else Path.cwd()
    return os.path.abspath(base / os.path.expanduser(path))


def absolute_paths(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A valid study file's mapping with its file paths (data, model weights, plugins) absolute, as
    `spec_from_dict` reads them."""
    raw = dict(raw)
    if raw.get("plugins"):
        raw["plugins"] = list(_plugins(raw["plugins"], source))
    if "data" in raw:
        raw["data"] = _data_paths(raw["data"], source)
    if isinstance(raw.get("model"), Mapping):
        raw["model"] = {key: _absolute(value, source) if key in MODEL_PATHS and isinstance(value, str) and value
                        else value for key, value in raw["model"].items()}
    return raw


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
            known = known_keys(StudySpec)
            raise ConfigError(f"{key}: unknown key{did_you_mean(key, known)}; known: {', '.join(known)}")
    training = raw.get("training")
    if isinstance(training, Mapping) and training.get("steps") is not None and "epochs" in training:
        raise ConfigError("training: give epochs or steps, not both (steps sets the epochs from the size of the "
                          "training split)")
    searched = search_spaces(raw, TrainingSpec)
    given = {"searched": searched, "model": _model(raw.pop("model", {}) or {}, source),
             "regularizers": _regularizers(raw.pop("regularizers", None)),
             "plugins": _plugins(raw.pop("plugins", ()) or (), source)}
    if "data" in raw:
        given["data"] = _data_paths(raw.pop("data"), source)
    return StudySpec.from_mapping({**raw, **given, "name": name, "source": source}, "")


