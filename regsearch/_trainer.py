"""One trial's training loop and its eval-mode gap metrics; nothing else."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from regsearch import _contract
from regsearch._device import autocast_context, training_autocast
from regsearch._errors import PluginError, TrialDiverged
from regsearch._optim import build_optimizer, schedule
from regsearch._regularizer import Applied, LoopState
from regsearch._spec import TrainingSpec
from regsearch._threads import ThreadChooser
from regsearch.data._tensors import Batcher, TensorData

__all__ = ["Applied", "TrialDiverged", "evaluate", "fit"]


def evaluate(model: nn.Module, batcher: Batcher, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             autocast: torch.dtype | None = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode, without augmentation or penalty (under `autocast`, if any)."""
    model.eval()
    loss_sum = torch.zeros((), device=y.device)
    right = torch.zeros((), device=y.device, dtype=torch.long)
    with torch.no_grad(), autocast_context(y.device, autocast):
        for start in range(0, len(y), batch_size):
            out = model(batcher.inputs(x[start:start + batch_size])).float()
            target = y[start:start + batch_size]
            loss_sum += F.cross_entropy(out, target, reduction="sum")
            right += (out.argmax(1) == target).sum()
    n = max(len(y), 1)
    return loss_sum.item() / n, right.item() / n


def fit(model: nn.Module, data: TensorData, applied: Sequence[Applied], training: TrainingSpec, *, lr: float,
        device: torch.device, seed: int, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        epochs: int | None = None, autocast: torch.dtype | None | Literal["auto"] = "auto") -> dict[str, float]:
    """Train `model` on `data` (already on `device`); returns the final model's metrics.

    `autocast`: the dtype of `autocast_dtype` (None: float32), or "auto" to choose it here as `training.precision`
    says.

    Each epoch ends with eval-mode metrics on a fixed training subset the size of the validation split and on
    the validation split; `on_epoch(epoch, metrics)` receives them (1-based epoch) and may raise to stop. A
    regularizer may end training early (`state.stop`) or replace the model at `on_train_end` (SWA): the
    replacement is evaluated once more, its metrics are returned, and its weights are loaded into `model`.
    """
    if autocast == "auto":  # before the seed: the trial's own choice, made before fit, draws nothing either
        autocast = training_autocast(training, device, model, data)
    torch.manual_seed(seed)
    loop = _Loop(model, data, applied, training, lr, device, seed, epochs or training.epochs, autocast)
    for a in applied:
        a.regularizer.on_train_start(loop.state, a.params)
    metrics: dict[str, float] = {}
    for epoch in range(1, loop.epochs + 1):
        loop.state.epoch = epoch
        for a in applied:
            a.regularizer.on_epoch_start(loop.state, a.params)
        fit_loss, penalty = loop.train_epoch()
        if not math.isfinite(fit_loss):
            raise TrialDiverged(f"loss is NaN/inf at epoch {epoch}")
        metrics = {**loop.measure(loop.model), "fit_loss": fit_loss, "penalty": penalty}
        loop.state.metrics = metrics
        for a in applied:
            a.regularizer.on_epoch_end(loop.state, a.params)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if loop.state.stop:
            break
    for a in applied:
        a.regularizer.on_train_end(loop.state, a.params)
    if loop.state.model is not loop.model:
        metrics = {**metrics, **loop.measure(loop.state.model)}
        _adopt(model, loop.state.model, applied)
    return metrics


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in an epoch of `n` examples; a last batch of one is dropped (it breaks BatchNorm)."""
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


class _Loop:
    """What one `fit` sets up once (optimizer, schedule, the fixed training subset) and its epochs."""

    def __init__(self, model: nn.Module, data: TensorData, applied: Sequence[Applied], training: TrainingSpec,
                 lr: float, device: torch.device, seed: int, epochs: int, autocast: torch.dtype | None) -> None:
        # channels_last: faster conv steps on CPU (oneDNN's native layout) and on CUDA
        channels_last = device.type in ("cuda", "cpu") and data.is_image
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.data, self.training, self.device, self.epochs, self.autocast = data, training, device, epochs, autocast
        self.batcher = Batcher(data, channels_last=channels_last)
        self.optimizer = build_optimizer(self.model, applied, training, lr)
        self.n = len(data.y_train)
        self.bs = min(training.batch_size, self.n)
        self.steps = steps_per_epoch(self.n, self.bs)
        self.scheduler = schedule(self.optimizer, training, lr, self.steps * epochs)
        self.gen = torch.Generator().manual_seed(seed)
        subset = torch.randperm(self.n, generator=self.gen)[:len(data.y_val)].to(device)
        self.x_fixed, self.y_fixed = data.x_train[subset], data.y_train[subset]
        self.penalizers = [a for a in applied if a.overrides("penalty")]
        self.batch_hooks = [a for a in applied if a.overrides("on_batch_end")]
        self.transforms = sorted((a for a in applied if a.overrides("transform_batch")),
                                 key=lambda a: a.regularizer.batch_order)
        self.threads = ThreadChooser(device)
        self.state = LoopState(model=self.model, optimizer=self.optimizer, epochs=epochs,
                               num_classes=data.num_classes, inputs=self._inputs)

    def _inputs(self):
        size = self.training.eval_batch_size
        for start in range(0, self.n, size):
            yield self.batcher.inputs(self.data.x_train[start:start + size])

    def step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step on the examples `idx`: (the loss without penalty, the penalty or None)."""
        x, y = self.batcher.inputs(self.data.x_train[idx]), self.data.y_train[idx]
        for a in self.transforms:
            x, y = transformed(a, x, y, checked=self.state.step > 0)
        with autocast_context(self.device, self.autocast):
            out = self.model(x)
            # y: int labels, or (N, C) probabilities once a plugin made them soft (mixup, label smoothing)
            loss = F.cross_entropy(out.float(), y, label_smoothing=self.training.label_smoothing)
        terms = [t for a in self.penalizers if (t := a.regularizer.penalty(self.model, a.params)) is not None]
        penalty = sum(terms[1:], terms[0]) if terms else None
        self.optimizer.zero_grad(set_to_none=True)
        (loss if penalty is None else loss + penalty).backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.state.step += 1
        for a in self.batch_hooks:
            a.regularizer.on_batch_end(self.state, a.params)
        return loss.detach(), None if penalty is None else penalty.detach()

    def train_epoch(self) -> tuple[float, float]:
        """One pass over the training split: (mean training loss, mean penalty), as the steps saw them."""
        self.model.train()
        order = torch.randperm(self.n, generator=self.gen).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        penalty_sum = torch.zeros((), device=self.device)
        plan = self.threads.plan(self.steps)
        timed: dict[int, float] = {}
        for i in range(self.steps):
            probing = plan is not None and i < len(plan)
            if probing:
                self.threads.use(plan[i])
                began = time.perf_counter()
            loss, penalty = self.step(order[i * self.bs:(i + 1) * self.bs])
            loss_sum += loss
            if penalty is not None:
                penalty_sum += penalty
            if probing and i == 0 and self.threads.too_small(time.perf_counter() - began):
                plan, probing = None, False
            if probing:
                if i % (len(plan) // 2):  # the first step after a switch is warm-up
                    timed[plan[i]] = timed.get(plan[i], 0.0) + time.perf_counter() - began
                if i == len(plan) - 1:
                    self.threads.choose(timed)
        return loss_sum.item() / self.steps, penalty_sum.item() / self.steps

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Eval-mode loss and accuracy on the fixed training subset and the validation split, and their gaps."""
        size = self.training.eval_batch_size
        train_loss, train_acc = evaluate(model, self.batcher, self.x_fixed, self.y_fixed, size, self.autocast)
        val_loss, val_acc = evaluate(model, self.batcher, self.data.x_val, self.data.y_val, size, self.autocast)
        if not math.isfinite(val_loss) or not math.isfinite(train_loss):
            raise TrialDiverged(f"loss is NaN/inf at epoch {self.state.epoch}")
        return {"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
                "gap_loss": val_loss - train_loss, "gap_acc": train_acc - val_acc}


def transformed(a: Applied, x: torch.Tensor, y: torch.Tensor, checked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`a`'s transform_batch; the first batch of a trial is checked, so a broken plugin fails with its name."""
    result = a.regularizer.transform_batch(x, y, a.params)
    if checked:
        return result
    try:
        return _contract.batch(result, x)
    except PluginError as exc:
        raise _contract.named(f"regularizer {a.regularizer.name!r}", exc) from None


def _adopt(model: nn.Module, final: nn.Module, applied: Sequence[Applied]) -> None:
    """Load the final model's weights into the model the caller holds (same structure), or say who broke it."""
    try:
        model.load_state_dict(final.state_dict())
    except RuntimeError as exc:
        who = [a.regularizer.name for a in applied if a.overrides("on_train_end")]
        raise PluginError(f"on_train_end of {', '.join(map(repr, who))} left a model whose weights do not fit the "
                          f"trial's model (it must keep its structure, e.g. AveragedModel.module): {exc}") from None
