"""One trial's model: built from the trial's parameters, rebuilt from a stored trial, retrained, tested."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from torch import nn

from regsearch import _contract
from regsearch._device import PINNED
from regsearch._errors import PluginError
from regsearch._records import PRECISION_ATTR, is_baseline
from regsearch._regularizer import Applied, NamespacedTrial, Regularizer, TrialContext
from regsearch._search_space import suggest_switches
from regsearch._spec import RegularizerSpec, StudySpec, TrainingSpec
from regsearch._trainer import evaluate, fit
from regsearch.data._tensors import Batcher, TensorData
from regsearch.surgery import trace


@dataclass
class Experiment:
    """Everything a trial needs, prepared once per process."""

    spec: StudySpec
    data: TensorData
    build_model: Callable[[], nn.Module]
    regularizers: list[tuple[RegularizerSpec, Regularizer]]
    device: torch.device
    example: torch.Tensor


def trial_seed(study_seed: int, number: int) -> int:
    """Each trial's seed, derived from the study's seed and the trial number (logged on the trial)."""
    return (study_seed * 1_000_003 + number * 7_919 + 17) % (2**31 - 1)


def context(exp: Experiment, model: nn.Module, number: int, seed: int) -> TrialContext:
    return TrialContext(example_input=exp.example, device=exp.device, trial_number=number, seed=seed,
                        model=model, sites=trace(model, exp.example))


def training_for(exp: Experiment, trial: Any) -> TrainingSpec:
    """The study's training recipe; the baseline trial trains without label smoothing (unregularized)."""
    if is_baseline(trial):
        return exp.spec.training.replace(label_smoothing=0.0)
    return exp.spec.training


def build_trial(exp: Experiment, trial: Any, seed: int, *, baseline: bool = False
                ) -> tuple[nn.Module, list[Applied], float]:
    """Suggest this trial's parameters, build the model and let each switched-on regularizer change it.

    The baseline trial (`baseline=True`) switches every regularizer off, also those the study pins on.
    """
    torch.manual_seed(seed)
    model = exp.build_model().to(exp.device)
    if baseline:
        return model, [], exp.spec.training.lr.suggest(trial, "lr")
    on = set(suggest_switches(trial, [r for r, _ in exp.regularizers]))
    ctx = context(exp, model, trial.number, seed)
    applied = []
    for rspec, reg in exp.regularizers:
        if rspec.name in on:
            reg.context = ctx
            applied.append(Applied(reg, dict(reg.search_space(NamespacedTrial(trial, rspec.name)) or {})))
    lr = exp.spec.training.lr.suggest(trial, "lr")
    for a in sorted(applied, key=lambda a: a.regularizer.transform_order):
        try:
            model = _contract.transformed_model(a.regularizer.transform_model(model, a.params))
        except PluginError as exc:
            raise _contract.named(f"regularizer {a.regularizer.name!r}", exc) from None
    return model.to(exp.device), applied, lr


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
