"""The `training.*` and `model.*` keys a study searches, taken out of its raw mapping before it is validated."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from regsearch._errors import ConfigError
from regsearch._ranges import RANGE_KEYS, Choice, Range, read_choice, read_key_range

_NO_DEFAULT = object()
MODEL_OWN_KEYS = ("weights", "freeze_epochs")
"""The `model` keys any model takes, checked by the spec, never a model factory's options (nor searched)."""


def _split_searched(section: str, options: Mapping[Any, Any], default_of: Any, lists_are_values: bool,
                    check: Any) -> tuple[dict[Any, Any], dict[str, Range | Choice]]:
    """A section's options with each searched key set to its baseline value, and the searched keys.

    `{choices: [...]}` searches any key; `{low, high, log, step}` and `[low, high]` search a key whose default is a
    scalar number (where lists are values, as in `model.hidden: [256, 128]`, a list searches only such a key).
    Every bound and choice is checked by `check(key, value)` as a fixed value would be.
    """
    fixed, searched = dict(options), {}
    for key, value in options.items():
        where = f"{section}.{key}"
        if isinstance(value, Mapping) and "choices" in value:
            space: Range | Choice = read_choice(value, where)
        elif isinstance(value, (Mapping, list, tuple)) and key != "lr":  # lr: its own field, a log range
            default = default_of(key)
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            ranged = isinstance(value, Mapping) and set(value) <= set(RANGE_KEYS)
            if not numeric and lists_are_values and not ranged:
                continue  # a list or mapping value, the model factory's to check
            if not numeric and default is not _NO_DEFAULT:
                raise ConfigError(f"{where}: a range searches a numeric key ({key} is {default!r} by default); "
                                  f"to search it, write {{choices: [...]}}; got {value!r}")
            whole = (isinstance(default, int) and not isinstance(default, bool)) or (
                default is _NO_DEFAULT and _whole_bounds(value))  # an import path's key: as its bounds are written
            space = read_key_range(value, where, integer=whole)
        else:
            continue
        for bound in space.values():
            check(key, bound)
        fixed[key] = space.middle
        if len(set(map(str, space.values()))) > 1:
            searched[where] = space
    return fixed, searched


def _whole_bounds(value: Any) -> bool:
    """Whether a range's bounds are written as whole numbers (`[16, 64]`, `{low: 16, high: 64}`)."""
    bounds = [value.get("low"), value.get("high")] if isinstance(value, Mapping) else list(value)
    return all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)


def _model_defaults(name: Any) -> dict[str, Any]:
    """A built-in model's option defaults (none for another name: the model factory reports it)."""
    from regsearch.models import MODELS  # imports torch: only asked when a model option is a list or mapping

    factory = MODELS.get(name) if isinstance(name, str) else None
    if factory is None:
        return {}
    return {n: p.default for n, p in inspect.signature(factory).parameters.items() if p.default is not p.empty}


def search_spaces(raw: dict[str, Any], training_spec: Any) -> dict[str, Range | Choice]:
    """Take the searched `training.*` and `model.*` keys out of a study's raw mapping (in place); `training_spec`
    (the spec's TrainingSpec) checks every bound of a training key as a fixed value would be."""
    searched: dict[str, Range | Choice] = {}
    training = raw.get("training")
    if isinstance(training, Mapping):
        if isinstance(training.get("steps"), (Mapping, list, tuple)):
            raise ConfigError("training.steps: cannot be searched (the epochs are set once from it and the training "
                              f"split's size); give one number, or search training.epochs; got {training['steps']!r}")
        fields = training_spec.model_fields
        raw["training"], searched = _split_searched(
            "training", training, lambda key: fields[key].default if key in fields else _NO_DEFAULT, False,
            lambda key, value: training_spec.from_mapping({key: value}, "training"))
    model = raw.get("model")
    if isinstance(model, Mapping):
        defaults: dict[str, Any] = {}

        def default_of(key: Any) -> Any:
            if not defaults:
                defaults.update(_model_defaults(model.get("name", "mlp")), name="")
            return defaults.get(key, _NO_DEFAULT)

        kept = ("name", *MODEL_OWN_KEYS)
        options = {k: v for k, v in model.items() if k not in kept}
        options, more = _split_searched("model", options, default_of, True, lambda key, value: None)
        raw["model"] = {**{k: model[k] for k in kept if k in model}, **options}
        searched.update(more)
    return searched
