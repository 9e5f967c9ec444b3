"""The regularizer contract: one required method, the rest optional hooks with no-op defaults."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import optuna
    import torch
    from torch import nn

    from regsearch.surgery import Site


@dataclass
class TrialContext:
    """What the framework tells a regularizer about the trial it is applied to."""

    example_input: torch.Tensor
    """A small batch of real model inputs, already on the training device."""
    device: torch.device
    trial_number: int
    seed: int
    model: nn.Module
    """The model as built, before any regularizer changed it."""
    sites: list[Site]
    """Its leaf modules in forward order with their output shapes (see `regsearch.surgery.trace`)."""


@dataclass
class LoopState:
    """The training loop as the loop-event hooks see it; hooks may change the model or optimizer in place."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0
    epochs: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    """The metrics of the last finished epoch (train_acc, val_acc, gap_acc, ...)."""
    num_classes: int = 0
    """How many classes the labels have (soft targets are (N, num_classes) probabilities)."""
    stop: bool = False
    """Set it in `on_epoch_end` to end training after this epoch (early stopping)."""
    inputs: Callable[[], Iterator[torch.Tensor]] | None = field(default=None, repr=False)
    """Set by the trainer; see `batches`."""

    def batches(self) -> Iterator[torch.Tensor]:
        """The training inputs in batches, normalised, not augmented (e.g. for `swa_utils.update_bn`)."""
        if self.inputs is None:
            return iter(())
        return self.inputs()


class Regularizer(abc.ABC):
    """Base class of every regularizer plugin.

    The constructor receives the plugin's options from the study file as keyword arguments and stores them
    (validating them is fine; building models or touching data is not). `search_space` is the only required
    method; every other hook is optional and does nothing by default. Parameter names suggested on the trial
    are namespaced by the framework as ``<plugin>.<name>``.
    """

    name: ClassVar[str] = ""
    """The registry name, set by `register` / the entry point name."""
    transform_order: ClassVar[int] = 0
    """Lower runs `transform_model` first (normalization layers go in before dropout is placed)."""
    batch_order: ClassVar[int] = 0
    """Lower runs `transform_batch` first (the built-in flip/translate before cutout or mixing)."""

    context: TrialContext | None = None
    """Set by the framework before the hooks of a trial are called."""

    @abc.abstractmethod
    def search_space(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggest this plugin's hyperparameters on `trial` and return the values it will use."""

    def transform_model(self, model: nn.Module, params: dict[str, Any]) -> nn.Module:
        """Change the model's structure (insert modules at sites) and return it."""
        return model

    def param_groups(self, model: nn.Module, params: dict[str, Any], groups: list[dict]) -> list[dict]:
        """Reshape the optimizer's parameter groups (e.g. per-group weight decay) and return them."""
        return groups

    def penalty(self, model: nn.Module, params: dict[str, Any]) -> torch.Tensor | None:
        """A scalar added to the training loss at every step (logged on its own as `penalty`)."""
        return None

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, params: dict[str, Any]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Change a training batch (normalised inputs, int labels or (N, C) soft targets); never in eval."""
        return x, y

    def on_train_start(self, state: LoopState, params: dict[str, Any]) -> None:
        """Called once before the first epoch."""

    def on_epoch_start(self, state: LoopState, params: dict[str, Any]) -> None:
        """Called at the start of every epoch."""

    def on_batch_end(self, state: LoopState, params: dict[str, Any]) -> None:
        """Called after every optimizer step."""

    def on_epoch_end(self, state: LoopState, params: dict[str, Any]) -> None:
        """Called after every epoch's evaluation; `state.metrics` holds that epoch's metrics."""

    def on_train_end(self, state: LoopState, params: dict[str, Any]) -> None:
        """Called once after the last epoch; a model left in `state.model` becomes the trial's final model."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "context")
        return f"{type(self).__name__}({options})"


@dataclass(frozen=True)
class Applied:
    """A regularizer switched on in a trial, with the values its search space returned."""

    regularizer: Regularizer
    params: dict[str, Any]

    def overrides(self, hook: str) -> bool:
        """Whether the plugin has its own `hook` (the trainer calls only those)."""
        return getattr(type(self.regularizer), hook) is not getattr(Regularizer, hook)


HOOKS: dict[str, tuple[str, ...]] = {
    "search_space": ("trial",),
    "transform_model": ("model", "params"),
    "param_groups": ("model", "params", "groups"),
    "penalty": ("model", "params"),
    "transform_batch": ("x", "y", "params"),
    "on_train_start": ("state", "params"),
    "on_epoch_start": ("state", "params"),
    "on_batch_end": ("state", "params"),
    "on_epoch_end": ("state", "params"),
    "on_train_end": ("state", "params"),
}
"""Each hook and the positional parameters (after self) the framework calls it with."""


class NamespacedTrial:
    """A view of an Optuna trial that prefixes every parameter name with ``<namespace>.``."""

    def __init__(self, trial: optuna.Trial, namespace: str) -> None:
        self._trial = trial
        self._namespace = namespace

    def _name(self, name: str) -> str:
        return f"{self._namespace}.{name}"

    def suggest_float(self, name: str, low: float, high: float, **kwargs: Any) -> float:
        return self._trial.suggest_float(self._name(name), low, high, **kwargs)

    def suggest_int(self, name: str, low: int, high: int, **kwargs: Any) -> int:
        return self._trial.suggest_int(self._name(name), low, high, **kwargs)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._trial.suggest_categorical(self._name(name), choices)

    @property
    def number(self) -> int:
        return self._trial.number

    @property
    def params(self) -> dict[str, Any]:
        prefix = f"{self._namespace}."
        return {k[len(prefix):]: v for k, v in self._trial.params.items() if k.startswith(prefix)}

    def set_user_attr(self, key: str, value: Any) -> None:
        self._trial.set_user_attr(self._name(key), value)
