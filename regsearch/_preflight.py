"""Every regularizer's hooks run once on a real batch before any trial, so a broken plugin fails the study at once,
named, instead of failing every trial; the same steps time one training step."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from regsearch import _contract
from regsearch._device import autocast_context, training_autocast
from regsearch._errors import ConfigError, PluginError
from regsearch._estimate import trial_seconds
from regsearch._optim import build_optimizer
from regsearch._registry import RegularizerRegistry
from regsearch._regularizer import Applied, LoopState, NamespacedTrial, Regularizer
from regsearch._search_space import RecordingTrial
from regsearch._spec import RegularizerSpec
from regsearch._threads import fastest_threads
from regsearch._trainer import transformed
from regsearch._trial import Experiment, context, new_model
from regsearch.data._tensors import Batcher


def _who(rspec: RegularizerSpec, registry: RegularizerRegistry) -> str:
    info = registry.get(rspec.name) if rspec.name in registry else None
    return f"regularizer {rspec.name!r} ({info.source if info else '?'})"


class _Blame:
    """Says which plugin's which hook broke: config errors keep their key, anything else names the plugin."""

    def __init__(self, who: str, key: str) -> None:
        self.who, self.key, self.hook = who, key, ""

    def __enter__(self) -> _Blame:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, ConfigError):
            raise ConfigError(f"{self.key}: {exc}") from None
        if isinstance(exc, Exception):
            raise PluginError(f"{self.who}: {self.hook} failed: {type(exc).__name__}: {exc}") from exc
        return False


def _live(exp: Experiment) -> list[tuple[RegularizerSpec, Regularizer]]:
    """The study's regularizers but those switched off for good (`enabled: false`): no trial applies them."""
    return [(rspec, reg) for rspec, reg in exp.regularizers if rspec.enabled != "off"]


def _applied_all(exp: Experiment, registry: RegularizerRegistry, live: list[tuple[RegularizerSpec, Regularizer]]
                 ) -> tuple[nn.Module, list[Applied]]:
    """The model with every regularizer a trial can switch on (`live`), switched on at mid-range values."""
    model = new_model(exp, RecordingTrial()).to(exp.device)
    ctx = context(exp, model, 0, exp.spec.seed)
    applied = []
    for rspec, reg in live:
        with _Blame(_who(rspec, registry), f"regularizers.{rspec.name}") as blame:
            blame.hook = "search_space"
            reg.context = ctx
            applied.append(Applied(reg, _contract.search_space_params(
                reg.search_space(NamespacedTrial(RecordingTrial(), rspec.name)))))
            blame.hook = "transform_model"
            model = _contract.transformed_model(reg.transform_model(model, applied[-1].params)).to(exp.device)
    return model, applied


def _first_batch(exp: Experiment, registry: RegularizerRegistry, state: LoopState,
                 live: list[tuple[RegularizerSpec, Regularizer]], applied: list[Applied]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A real training batch, through every batch transform (each checked against the contract)."""
    batch = min(exp.spec.training.batch_size, len(exp.data.y_train))
    x, y = Batcher(exp.data).inputs(exp.data.x_train[:batch]), exp.data.y_train[:batch]
    for (rspec, _), a in zip(live, applied, strict=True):
        if not a.overrides("transform_batch"):
            continue
        with _Blame(_who(rspec, registry), f"regularizers.{rspec.name}") as blame:
            blame.hook = "transform_batch"
            a.regularizer.on_train_start(state, a.params)
            x, y = _contract.batch(transformed(a, x, y, checked=True), x)
            a.regularizer.on_train_end(state, a.params)
    return x, y


def preflight(exp: Experiment, registry: RegularizerRegistry) -> float | None:
    """Run every regularizer's hooks once on a real batch before any trial; returns the seconds one trial takes
    with every regularizer on, on a CPU (`trial_seconds`; None on other devices, which are not warned about).

    A plugin that breaks the contract (bad search space, a hook raising, a penalty that is not a scalar on the
    training device) is reported here, naming the plugin, instead of failing every trial.
    """
    live = _live(exp)
    model, applied = _applied_all(exp, registry, live)
    autocast = training_autocast(exp.spec.training, exp.device, model, exp.data)
    try:
        optimizer = build_optimizer(model, applied, exp.spec.training, exp.spec.training.lr.low)
    except Exception as exc:
        raise PluginError(f"building the optimizer from the regularizers' parameter groups failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    state = LoopState(model=model, optimizer=optimizer, epochs=exp.spec.training.epochs,
                      num_classes=exp.data.num_classes)
    x, y = _first_batch(exp, registry, state, live, applied)
    model.train()
    step = _step(exp, registry, model, live, applied, autocast, x, y)
    step()
    seconds = None
    if exp.device.type == "cpu":
        fastest_threads(step)  # the thread count of epochs too short for fit's own probe
        seconds = trial_seconds(exp, model, applied)
    for _, reg in exp.regularizers:
        reg.context = None
    return seconds


def _step(exp: Experiment, registry: RegularizerRegistry, model: nn.Module,
          live: list[tuple[RegularizerSpec, Regularizer]], applied: list[Applied],
          autocast: torch.dtype | None, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """One timed forward and backward pass, every penalty checked against the contract."""
    def step() -> float:
        start = time.perf_counter()
        with autocast_context(exp.device, autocast):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        for (rspec, reg), a in zip(live, applied, strict=True):
            try:
                term = reg.penalty(model, a.params)
            except Exception as exc:
                raise PluginError(f"{_who(rspec, registry)}: penalty failed: {type(exc).__name__}: {exc}") from exc
            try:
                term = _contract.penalty_term(term, loss.device)
            except PluginError as exc:
                raise _contract.named(_who(rspec, registry), exc) from None
            if term is not None:
                loss = loss + term
        model.zero_grad(set_to_none=True)
        loss.backward()
        return time.perf_counter() - start

    return step
