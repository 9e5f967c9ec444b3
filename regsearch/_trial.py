"""One trial's model: built from the trial's parameters, rebuilt from a stored trial, retrained, tested."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from torch import nn

from regsearch import _contract
from regsearch._device import PINNED
from regsearch._errors import ConfigError, PluginError
from regsearch._records import PRECISION_ATTR, is_baseline
from regsearch._regularizer import Applied, NamespacedTrial, Regularizer, TrialContext
from regsearch._search_space import stored_training, suggest_switches, suggest_training
from regsearch._spec import RegularizerSpec, StudySpec, TrainingSpec
from regsearch._trainer import evaluate, fit
from regsearch.data._tensors import Batcher, TensorData
from regsearch._weights import FrozenBackbone
from regsearch.surgery import trace


@dataclass
class Experiment:
    """Everything a trial needs, prepared once per process."""

    spec: StudySpec
    data: TensorData
    build_model: Callable[..., nn.Module]
    """No argument, or one: the trial (see `new_model`)."""
    regularizers: list[tuple[RegularizerSpec, Regularizer]]
    device: torch.device
    example: torch.Tensor
    model_space: dict[str, Any] = field(default_factory=dict)
    """The parameters the model factory asks of a trial (`model.<name>` -> Optuna distribution)."""


def takes_trial(factory: Callable[..., nn.Module]) -> bool:
    """Whether a model factory takes the trial: one required positional parameter (none: it takes nothing)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: called as it is
        return False
    required = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]
    if len(required) > 1:
        raise ConfigError(f"model: a model factory takes no argument or one (the Optuna trial); "
                          f"{getattr(factory, '__name__', factory)!s} takes {', '.join(required)}")
    return len(required) == 1


def new_model(exp: Experiment, trial: Any) -> nn.Module:
    """An untrained model; a factory taking the trial gets it with its parameter names under `model.`
    (`trial.suggest_int("width", ...)` is the parameter `model.width`), as the study's searched model keys are."""
    if takes_trial(exp.build_model):
        return exp.build_model(NamespacedTrial(trial, "model"))
    return exp.build_model()


def trial_seed(study_seed: int, number: int) -> int:
    """Each trial's seed, derived from the study's seed and the trial number (logged on the trial)."""
    return (study_seed * 1_000_003 + number * 7_919 + 17) % (2**31 - 1)


def context(exp: Experiment, model: nn.Module, number: int, seed: int) -> TrialContext:
    return TrialContext(example_input=exp.example, device=exp.device, trial_number=number, seed=seed,
                        model=model, sites=trace(model, exp.example))


def training_for(exp: Experiment, trial: Any) -> TrainingSpec:
    """The study's training recipe with the trial's values of its searched keys (from `trial.params`); the
    baseline trial trains without label smoothing (unregularized)."""
    values = stored_training(exp.spec, trial.params)
    values.pop("lr", None)  # passed on its own (`build_trial`)
    training = exp.spec.training.replace(**values) if values else exp.spec.training
    if is_baseline(trial):
        return training.replace(label_smoothing=0.0)
    return training


def build_trial(exp: Experiment, trial: Any, seed: int, *, baseline: bool = False,
                on: Collection[str] | None = None) -> tuple[nn.Module, list[Applied], float]:
    """Suggest this trial's parameters, build the model and let each switched-on regularizer change it.

    The baseline trial (`baseline=True`) switches every regularizer off, also those the study pins on. `on`, where
    given, names the regularizers switched on instead of the trial's switches (an ablation's configurations).
    """
    torch.manual_seed(seed)
    model = new_model(exp, trial).to(exp.device)
    frozen = frozen_backbone(exp, model)
    if baseline and on is None:
        return model, frozen, _lr(exp, trial, suggest_training(trial, exp.spec, baseline=True))
    on = set(suggest_switches(trial, [r for r, _ in exp.regularizers])) if on is None else set(on)
    ctx = context(exp, model, trial.number, seed)
    applied = []
    for rspec, reg in exp.regularizers:
        if rspec.name in on:
            reg.context = ctx
            applied.append(Applied(reg, dict(reg.search_space(NamespacedTrial(trial, rspec.name)) or {})))
    lr = _lr(exp, trial, suggest_training(trial, exp.spec, baseline=baseline))
    for a in sorted(applied, key=lambda a: a.regularizer.transform_order):
        try:
            model = _contract.transformed_model(a.regularizer.transform_model(model, a.params))
        except PluginError as exc:
            raise _contract.named(f"regularizer {a.regularizer.name!r}", exc) from None
    return model.to(exp.device), applied + frozen, lr


def frozen_backbone(exp: Experiment, model: nn.Module) -> list[Applied]:
    """`model.freeze_epochs` as the loop events that hold the backbone of the model as built (none where it is 0)."""
    epochs = exp.spec.model.freeze_epochs
    return [Applied(FrozenBackbone(model, epochs), {})] if epochs else []


def _lr(exp: Experiment, trial: Any, training: dict[str, Any]) -> float:
    """The trial's learning rate: among the searched training keys (a choice of rates), else from its range."""
    return training["lr"] if "lr" in training else exp.spec.training.lr.suggest(trial, "lr")


def rebuild(exp: Experiment, trial: optuna.trial.FrozenTrial) -> tuple[nn.Module, list[Applied], float, int]:
    """A stored trial's untrained model, regularizers, learning rate and seed, from its parameters."""
    seed = trial.user_attrs.get("seed", trial_seed(exp.spec.seed, trial.number))
    model, applied, lr = build_trial(exp, optuna.trial.FixedTrial(trial.params, number=trial.number), seed,
                                     baseline=is_baseline(trial))
    return model, applied, lr, seed


def stored_autocast(exp: Experiment, trial: optuna.trial.FrozenTrial) -> torch.dtype | None:
    """The precision a stored trial trained in, whatever this machine or the study file would choose now (another
    worker's machine may have had bf16 arithmetic). A trial stored before precisions were recorded trained as
    regsearch did then: bfloat16 on CUDA, float32 elsewhere."""
    recorded = trial.user_attrs.get(PRECISION_ATTR)
    if recorded is None:
        return torch.bfloat16 if exp.device.type == "cuda" else None
    return PINNED[recorded]


def retrain(exp: Experiment, trial: optuna.trial.FrozenTrial) -> nn.Module:
    """Train a stored trial again from its parameters and seed, in its precision (the same model on CPU)."""
    model, applied, lr, seed = rebuild(exp, trial)
    fit(model, exp.data, applied, training_for(exp, trial), lr=lr, device=exp.device, seed=seed,
        autocast=stored_autocast(exp, trial))
    return model


def test_score(exp: Experiment, model: nn.Module, autocast: torch.dtype | None) -> tuple[float, float]:
    """(loss, accuracy) on the test split, in eval mode and in the precision the trial trained in (`autocast`):
    asked once per study for the best trial and the baseline."""
    return evaluate(model, Batcher(exp.data), exp.data.x_test, exp.data.y_test, exp.spec.training.eval_batch_size,
                    autocast)
