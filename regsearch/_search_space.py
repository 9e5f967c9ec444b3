"""Which regularizers a trial switches on, asked of Optuna once and read back from stored parameters the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from regsearch._errors import PluginError
from regsearch._ranges import Choice, Range
from regsearch._spec import RegularizerSpec, StudySpec

NONE = "none"


def _is_choice(r: RegularizerSpec) -> bool:
    return r.choice is not None and r.enabled == "search"


def choice_param(group: str) -> str:
    return f"choice.{group}"


def enabled_param(name: str) -> str:
    return f"{name}.enabled"


def suggest_switches(trial: Any, regularizers: Sequence[RegularizerSpec]) -> list[str]:
    """Ask the trial which regularizers are on: a categorical per choice group ("none" or one member), an on/off
    switch per searched one; pinned ones are on, "off" ones never. Returns the names switched on, in study order."""
    chosen: dict[str, Any] = {}
    for r in regularizers:
        if _is_choice(r) and r.choice not in chosen:
            members = [m.name for m in regularizers if m.choice == r.choice and _is_choice(m)]
            chosen[r.choice] = trial.suggest_categorical(choice_param(r.choice), [NONE, *members])
    on = []
    for r in regularizers:
        if _is_choice(r):
            picked = chosen[r.choice] == r.name
        else:
            picked = r.enabled == "on" or (
                r.enabled == "search" and trial.suggest_categorical(enabled_param(r.name), [True, False]))
        if picked:
            on.append(r.name)
    return on


def switched_on(regularizers: Sequence[RegularizerSpec], params: Mapping[str, Any]) -> list[str]:
    """The names `suggest_switches` switched on, read back from a stored trial's parameters."""
    return suggest_switches(_StoredSwitches(params), regularizers)


class _StoredSwitches:
    """A stored trial's answers; a switch it lacks (made by another version of the study file) reads as off."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self.params.get(name, NONE if NONE in choices else False)


def param_name(key: str) -> str:
    """The Optuna parameter of a searched study key (`training.batch_size`, `model.hidden`); `training.lr` keeps
    the name `lr` it had before other keys could be searched, so that stored studies resume."""
    return "lr" if key == "training.lr" else key


def suggest_training(trial: Any, spec: StudySpec, *, baseline: bool = False) -> dict[str, Any]:
    """This trial's values of the searched `training.*` keys, by key (`batch_size`); the baseline trial asks no
    label smoothing (it trains without)."""
    values = {}
    for key, space in spec.searched.items():
        section, name = key.split(".", 1)
        if section == "training" and not (baseline and name == "label_smoothing"):
            values[name] = space.suggest(trial, param_name(key))
    return values


def stored_training(spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """`suggest_training`'s values read back from a trial's parameters (a key it lacks keeps the study's value)."""
    return {key.split(".", 1)[1]: space.decode(params[param_name(key)]) for key, space in spec.searched.items()
            if key.startswith("training.") and param_name(key) in params}


def most_epochs(spec: StudySpec) -> int:
    """The most epochs a trial trains (the high end of searched epochs): the Hyperband pruner's resource."""
    space = spec.searched.get("training.epochs")
    return max(int(v) for v in space.values()) if space is not None else spec.training.epochs


def encoded(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as Optuna stores them: a list value (a choice of `model.hidden`) as its JSON text."""
    return {name: Choice.encode(value) for name, value in params.items()}


def _middle(dist: optuna.distributions.BaseDistribution) -> Any:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return dist.choices[0]
    integer = isinstance(dist, optuna.distributions.IntDistribution)
    return Range(dist.low, dist.high, log=dist.log, integer=integer, step=dist.step).middle


def baseline_params(spec: StudySpec, model_space: Mapping[str, optuna.distributions.BaseDistribution] | None = None
                    ) -> dict[str, Any]:
    """The baseline trial's parameters: the learning rate and each searched training and model key (label smoothing
    aside) at the first trial's value, else mid-range (a whole-number range: its rounded middle; choices: the first).

    `model_space`: the parameters a model factory taking the trial asked for (`prepare` records them).
    """
    first = encoded(spec.search.first_trial)
    middles = {param_name(key): Choice.encode(space.middle) for key, space in spec.searched.items()
               if key != "training.label_smoothing"}
    if not spec.training.lr.fixed and "training.lr" not in spec.searched:
        middles["lr"] = spec.training.lr.middle
    middles.update({name: _middle(dist) for name, dist in (model_space or {}).items()})
    return {name: first.get(name, value) for name, value in middles.items()}


class RecordingTrial:
    """Answers suggestions with a mid-range value and records the distributions (checks and listings)."""

    number = 0

    def __init__(self) -> None:
        self.distributions: dict[str, optuna.distributions.BaseDistribution] = {}
        self.params: dict[str, Any] = {}

    def _record(self, name: str, dist: optuna.distributions.BaseDistribution, value: Any) -> Any:
        if name in self.distributions and self.distributions[name] != dist:
            raise PluginError(f"parameter {name!r} is suggested twice with different ranges: "
                              f"{self.distributions[name]} and {dist}")
        self.distributions[name] = dist
        self.params.setdefault(name, value)
        return self.params[name]

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        dist = optuna.distributions.FloatDistribution(low, high, log=log, step=step)
        return self._record(name, dist, Range(low, high, log=log, step=step).middle)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        dist = optuna.distributions.IntDistribution(low, high, log=log, step=step)
        return self._record(name, dist, Range(low, high, log=log, integer=True, step=step).middle)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        dist = optuna.distributions.CategoricalDistribution(list(choices))
        return self._record(name, dist, list(choices)[0])

    def set_user_attr(self, key: str, value: Any) -> None:
        pass

    def report(self, value: float, step: int) -> None:
        pass

    def should_prune(self) -> bool:
        return False
