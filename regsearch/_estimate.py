"""How long one trial takes on this CPU, for the up-front warning only (never for a choice that changes results)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any

import optuna
from torch import nn

from regsearch._device import training_autocast
from regsearch._regularizer import Applied, LoopState, Regularizer
from regsearch._threads import ThreadChooser, callers_threads
from regsearch._trainer import fit, steps_per_epoch
from regsearch._trial import Experiment

logger = logging.getLogger("regsearch")

TIMED_STEPS = 12
"""Training steps per epoch of `trial_seconds`' run: fit's thread probe (6 steps, in epochs of 10 or more) and as
many steps after it on the thread count it chose."""
LONG_TRIAL_S = 300.0
"""`prepare` warns when one trial, every regularizer on, is estimated to take longer than this on a CPU."""


class _StepClock(Regularizer):
    """Notes when each epoch starts, each training step ends and each epoch's evaluation ends (fit's own hooks)."""

    name = "step_clock"

    def __init__(self) -> None:
        self.epochs: list[list[float]] = []

    def search_space(self, trial: optuna.Trial) -> dict[str, Any]:
        return {}

    def on_epoch_start(self, state: LoopState, params: dict[str, Any]) -> None:
        self.epochs.append([time.perf_counter()])

    def on_batch_end(self, state: LoopState, params: dict[str, Any]) -> None:
        self.epochs[-1].append(time.perf_counter())

    def on_epoch_end(self, state: LoopState, params: dict[str, Any]) -> None:
        self.epochs[-1].append(time.perf_counter())


class _PerStep(Regularizer):
    """A plugin's per-step work only (parameter groups, penalty, batch transform): before any trial, the estimate
    calls none of the loop events a plugin may act on (its own bookkeeping of a trial)."""

    def __init__(self, inner: Regularizer) -> None:
        self.inner = inner
        self.name = inner.name
        self.batch_order = inner.batch_order

    def search_space(self, trial: optuna.Trial) -> dict[str, Any]:
        return {}

    def param_groups(self, model: nn.Module, params: dict[str, Any], groups: list[dict]) -> list[dict]:
        return self.inner.param_groups(model, params, groups)

    def penalty(self, model: nn.Module, params: dict[str, Any]) -> Any:
        return self.inner.penalty(model, params)

    def transform_batch(self, x: Any, y: Any, params: dict[str, Any]) -> tuple[Any, Any]:
        return self.inner.transform_batch(x, y, params)


def trial_seconds(exp: Experiment, model: nn.Module, applied: list[Applied]) -> float | None:
    """Seconds one trial of `model` takes here: `fit` itself, in the trial's precision, for two epochs of a cut of
    the training data, the second (warm) one scaled to the full data and evaluation splits. None when the run
    fails (the trials will say why); `model` is trained."""
    training, data = exp.spec.training, exp.data
    n = len(data.y_train)
    bs = min(training.batch_size, n)
    steps = steps_per_epoch(n, bs)
    cut = min(steps, TIMED_STEPS)
    n_val = len(data.y_val) if cut == steps else max(1, round(len(data.y_val) * cut / steps))
    part = dataclasses.replace(data, x_train=data.x_train[:cut * bs], y_train=data.y_train[:cut * bs],
                               x_val=data.x_val[:n_val], y_val=data.y_val[:n_val])
    # the trial's epochs begin with the same thread probe (at a slow thread count for half of it): counted whole
    probe = len(ThreadChooser(exp.device).plan(steps) or ())
    clock = _StepClock()
    with callers_threads():  # fit's thread probe may change the count; the trials start from this one
        try:
            per_step = [Applied(_PerStep(a.regularizer), a.params) for a in applied]
            fit(model, part, [*per_step, Applied(clock, {})], training, lr=training.lr.low, device=exp.device,
                seed=exp.spec.seed, epochs=2, autocast=training_autocast(training, exp.device, model, data))
        except Exception as exc:  # a diverging mid-range plugin value, a hook that breaks: no estimate
            logger.debug("no trial time estimate: %s: %s", type(exc).__name__, exc)
    # the first epoch pays the cold start (oneDNN kernels made for each shape): used only when it is the only one
    marks = next((e for e in reversed(clock.epochs) if len(e) == cut + 2), None)
    if marks is None:
        return None
    took = [b - a for a, b in itertools.pairwise(marks)]
    train, evaluation = took[:cut], took[cut]
    if cut < steps:
        rest = train[probe:] or train
        train = train[:probe] + [sum(rest) / len(rest)] * (steps - probe)
        evaluation *= len(data.y_val) / n_val
    return (sum(train) + evaluation) * training.epochs


def announce_slow_trials(exp: Experiment, high: float | None, bare: nn.Module) -> None:
    """Warn, with a range from the model without regularizers (`bare`) to all of them on, when trials are long."""
    if high is None or high <= LONG_TRIAL_S:
        return
    low = trial_seconds(exp, bare, [])
    span = (f"{duration_range(*sorted((low, high)))} (from no regularizer to all of them on" if low is not None
            else f"{duration_range(high, high)} (every regularizer on")
    logger.warning("on this CPU one trial will take about %s; %d epochs x %d training examples). To shrink the "
                   "study: --set data.train_size=5000 --set training.epochs=5, or run on a GPU.", span,
                   exp.spec.training.epochs, len(exp.data.y_train))


def duration_range(low: float, high: float) -> str:
    """'35-58 s', '2.1-5.4 min', '12 min': in seconds under two minutes, two figures at most."""
    scale, unit = (1, "s") if high < 120 else (60, "min")
    low_text, high_text = (f"{v / scale:.1f}" if v / scale < 10 else f"{v / scale:.0f}" for v in (low, high))
    return f"{high_text} {unit}" if low_text == high_text else f"{low_text}-{high_text} {unit}"
