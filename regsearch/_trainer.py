"""One trial's training: optimizer from the regularizers' parameter groups, the loop, eval-mode gap metrics."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from regsearch._errors import PluginError, TrialError
from regsearch._regularizer import LoopState, Regularizer
from regsearch._spec import TrainingSpec
from regsearch.data._tensors import Batcher, TensorData
from regsearch.surgery import watch


class TrialDiverged(TrialError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class Applied:
    """A regularizer switched on in a trial, with the values its search space returned."""

    regularizer: Regularizer
    params: dict[str, Any]


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _overrides(reg: Regularizer, hook: str) -> bool:
    return getattr(type(reg), hook) is not getattr(Regularizer, hook)


_CPU_FUSED = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)
"""torch has fused SGD and AdamW steps for CPU tensors from 2.4 on."""


def _fusable(model: nn.Module, groups: list[dict]) -> bool:
    """One fused kernel per step instead of a few per parameter group, where torch has one for every parameter.

    Small networks on a GPU wait on the host's kernel launches; on a CPU a digits MLP's SGD step took 0.73 ms
    fused against 0.82 ms with foreach. Fused steps take no sparse gradients (`sparse=True` embeddings).
    """
    devices = ("cpu", "cuda") if _CPU_FUSED else ("cuda",)
    return (all(p.device.type in devices and p.is_floating_point() for g in groups for p in g["params"])
            and not any(getattr(m, "sparse", False) is True for m in model.modules()))


def build_optimizer(model: nn.Module, applied: Sequence[Applied], training: TrainingSpec, lr: float
                    ) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW over the parameter groups the regularizers shaped."""
    groups: list[dict] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    for a in applied:
        groups = a.regularizer.param_groups(model, a.params, groups)
    fused = {"fused": True} if _fusable(model, groups) else {}
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=training.momentum, nesterov=training.momentum > 0,
                               weight_decay=0.0, **fused)
    # AdamW's own default decay is 0.01; decay is the l2 plugin's business, so it is 0 unless a group sets it.
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, **fused)


def _schedule(optimizer: torch.optim.Optimizer, training: TrainingSpec, lr: float, total_steps: int):
    if training.schedule == "onecycle":
        # OneCycleLR divides by zero when pct_start * total_steps == 1 (4 steps in all at 0.25)
        pct_start = 0.25 if total_steps * 0.25 != 1 else 0.5
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                   pct_start=pct_start, cycle_momentum=False)
    if training.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether `device` does bfloat16 arithmetic in hardware: a GPU from Ampere on, a CPU with AVX512-BF16 or AMX.

    Elsewhere bf16 is emulated: a CIFAR CNN step ran 12x slower than float32 on an AVX2 CPU.
    """
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4 does not emulate, and has no such argument
            return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_bf16()


@functools.cache
def _cpu_has_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_cpu_support_amx_tile")
    if any(getattr(torch.cpu, check, lambda: False)() for check in checks):
        return True
    try:  # torch before 2.5 cannot say: ask the kernel (Linux)
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


BF16_MIN_STEP_FLOPS = 5e7
"""Below this (a training step's forward and backward FLOPs) bf16 does not pay on a CPU: autocast's casts cost
more than the arithmetic saves. Measured on an AVX512-BF16 CPU, one thread: a 30 MFLOP digits MLP step 0.90x,
60 MFLOP 1.10x, 111 MFLOP 1.35x, the 8 GFLOP CIFAR CNN step 1.69x."""


def step_flops(model: nn.Module, x: torch.Tensor) -> float:
    """A training step's FLOPs on batch `x`: the Linear and convolution layers' forward, times 3 (with backward).

    One forward pass in eval mode without gradients (`surgery.watch`: the model is left as it was); other
    operations are not counted (they are not what bf16 speeds up). Backward is taken as twice the forward, so
    the first layer's input gradient, which torch does not compute, is counted too (7 % of a digits MLP step).
    """
    total = 0.0

    def linear(module: nn.Linear, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += 2.0 * out.numel() * module.in_features

    def conv(module: nn.modules.conv._ConvNd, inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        # each output element of a convolution (each input element of a transposed one) is a dot product
        dots, width = (inputs[0].numel(), module.out_channels) if module.transposed else (out.numel(),
                                                                                          module.in_channels)
        total += 2.0 * dots * (width // module.groups) * math.prod(module.kernel_size)

    watch(model, x, {m: linear if isinstance(m, nn.Linear) else conv for m in model.modules()
                     if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))})
    return 3.0 * total


PINNED: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}
"""A pinned `training.precision`, or the one a trial recorded, as the dtype it autocasts to (None: no autocast)."""


def precision_name(autocast: torch.dtype | None) -> str:
    """How a trial's precision is recorded: the `PINNED` name of its autocast dtype."""
    return next(name for name, dtype in PINNED.items() if dtype == autocast)


def training_autocast(training: TrainingSpec, device: torch.device, model: nn.Module, data: TensorData
                      ) -> torch.dtype | None:
    """`autocast_dtype` for `model` trained on `data` (on `device`) as `training` says: its first training batch."""
    batch = data.x_train[:min(training.batch_size, len(data.y_train))]
    return autocast_dtype(training.precision, device, model, Batcher(data).inputs(batch))


def autocast_dtype(precision: str, device: torch.device, model: nn.Module, batch: torch.Tensor
                   ) -> torch.dtype | None:
    """The dtype a trial trains and evaluates in under autocast (None: float32), as `training.precision` says.

    "auto": bfloat16 on a GPU with native bf16, and on a CPU with it where a training step on `batch` (inputs as
    the model takes them, of the training batch size) is worth it (`BF16_MIN_STEP_FLOPS`); else float32. The
    choice depends only on the model, the batch size and the hardware, never on timing, so a study is
    reproducible.
    """
    if precision in PINNED:
        return PINNED[precision]
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else None
    if device.type == "cpu" and native_bf16(device) and step_flops(model, batch) >= BF16_MIN_STEP_FLOPS:
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing (float32) for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


_thread_budget: int | None = None


def set_thread_budget(threads: int) -> None:
    """The CPU threads this process may use (its share when several workers share the machine)."""
    global _thread_budget
    _thread_budget = max(1, threads)
    torch.set_num_threads(_thread_budget)


class ThreadChooser:
    """Picks, every epoch, whether this process trains faster on all its CPU threads or on one.

    On this project's 2-core machine a conv step on two threads ran 1.6x faster than on one when the machine was
    quiet, and 3.5x slower when another process was busy on the cores (OpenMP threads wait on each other at
    every barrier). Load changes during a study, so the first steps of each epoch are timed both ways (a few
    steps out of hundreds) and the rest of the epoch runs on the faster. An explicit OMP_NUM_THREADS is left
    alone (set it to 1 for several workers on one machine).
    """

    def __init__(self, device: torch.device, probe_steps: int = 2) -> None:
        self.many = torch.get_num_threads()
        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            available = os.cpu_count() or 1
        self.many = _thread_budget or max(self.many, min(available, os.cpu_count() or 1))
        self.active = device.type == "cpu" and self.many > 1 and not os.environ.get("OMP_NUM_THREADS")
        self.probe_steps = probe_steps

    def plan(self, steps: int) -> list[int] | None:
        """Thread counts for the first steps of an epoch (warm-up, then each count timed), or None."""
        if not self.active or steps < 2 + 4 * self.probe_steps:
            return None
        return [self.many] * (1 + self.probe_steps) + [1] * (1 + self.probe_steps)

    def too_small(self, first_step_s: float) -> bool:
        """Steps of a few milliseconds (small MLPs) leave one core to the rest, without probing.

        The rest is the tracking process (or another worker): on this project's 2-core machine a second thread
        made a 20-trial digits study's trials 5 % faster when the machine was otherwise idle and 35 % slower
        beside the tracking process busy on the other core; switching per step to find out costs more than it
        saves.
        """
        if first_step_s < 0.02:
            self.active = False
            torch.set_num_threads(max(1, self.many - 1))
        return not self.active

    def choose(self, seconds: dict[int, float]) -> None:
        torch.set_num_threads(min(seconds, key=seconds.get))


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
    epochs = epochs or training.epochs
    if autocast == "auto":  # before the seed: the trial's own choice, made before fit, draws nothing either
        autocast = training_autocast(training, device, model, data)
    torch.manual_seed(seed)
    # channels_last: 1.6x faster conv steps on this project's CPU (oneDNN's native layout), and on CUDA too
    channels_last = device.type in ("cuda", "cpu") and data.is_image
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batcher = Batcher(data, channels_last=channels_last)
    optimizer = build_optimizer(model, applied, training, lr)
    n = len(data.y_train)
    bs = min(training.batch_size, n)
    steps = n // bs + (1 if n % bs >= 2 else 0)  # a last batch of one breaks BatchNorm: drop it
    scheduler = _schedule(optimizer, training, lr, steps * epochs)
    gen = torch.Generator().manual_seed(seed)
    subset = torch.randperm(n, generator=gen)[:len(data.y_val)].to(device)
    x_fixed, y_fixed = data.x_train[subset], data.y_train[subset]
    penalizers = [a for a in applied if _overrides(a.regularizer, "penalty")]
    batch_hooks = [a for a in applied if _overrides(a.regularizer, "on_batch_end")]
    batch_transforms = sorted((a for a in applied if _overrides(a.regularizer, "transform_batch")),
                              key=lambda a: a.regularizer.batch_order)
    threads = ThreadChooser(device)

    def inputs():
        for start in range(0, n, training.eval_batch_size):
            yield batcher.inputs(data.x_train[start:start + training.eval_batch_size])

    state = LoopState(model=model, optimizer=optimizer, epochs=epochs, num_classes=data.num_classes,
                      inputs=inputs)
    for a in applied:
        a.regularizer.on_train_start(state, a.params)
    metrics: dict[str, float] = {}
    for epoch in range(1, epochs + 1):
        state.epoch = epoch
        for a in applied:
            a.regularizer.on_epoch_start(state, a.params)
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        penalty_sum = torch.zeros((), device=device)
        plan = threads.plan(steps)
        timed: dict[int, float] = {}
        for i in range(steps):
            probing = plan is not None and i < len(plan)
            if probing:
                torch.set_num_threads(plan[i])
                began = time.perf_counter()
            idx = order[i * bs:(i + 1) * bs]
            x = batcher.inputs(data.x_train[idx])
            y = data.y_train[idx]
            for a in batch_transforms:
                x, y = _transformed(a, x, y, checked=state.step > 0)
            with autocast_context(device, autocast):
                out = model(x)
                # y: int labels, or (N, C) probabilities once a plugin made them soft (mixup, label smoothing)
                loss = F.cross_entropy(out.float(), y, label_smoothing=training.label_smoothing)
            total = loss
            for a in penalizers:
                term = a.regularizer.penalty(model, a.params)
                if term is not None:
                    total = total + term
                    penalty_sum += term.detach()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach()
            state.step += 1
            for a in batch_hooks:
                a.regularizer.on_batch_end(state, a.params)
            if probing and i == 0 and threads.too_small(time.perf_counter() - began):
                plan, probing = None, False
            if probing:
                if i % (len(plan) // 2):  # the first step after a switch is warm-up
                    timed[plan[i]] = timed.get(plan[i], 0.0) + time.perf_counter() - began
                if i == len(plan) - 1:
                    threads.choose(timed)
        fit_loss = loss_sum.item() / steps
        if not math.isfinite(fit_loss):
            raise TrialDiverged(f"loss is NaN/inf at epoch {epoch}")
        train_loss, train_acc = evaluate(model, batcher, x_fixed, y_fixed, training.eval_batch_size, autocast)
        val_loss, val_acc = evaluate(model, batcher, data.x_val, data.y_val, training.eval_batch_size, autocast)
        if not math.isfinite(val_loss) or not math.isfinite(train_loss):
            raise TrialDiverged(f"loss is NaN/inf at epoch {epoch}")
        metrics = {
            "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
            "gap_loss": val_loss - train_loss, "gap_acc": train_acc - val_acc,
            "fit_loss": fit_loss, "penalty": penalty_sum.item() / steps,
        }
        state.metrics = metrics
        for a in applied:
            a.regularizer.on_epoch_end(state, a.params)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if state.stop:
            break
    for a in applied:
        a.regularizer.on_train_end(state, a.params)
    if state.model is not model:
        final = state.model
        train_loss, train_acc = evaluate(final, batcher, x_fixed, y_fixed, training.eval_batch_size, autocast)
        val_loss, val_acc = evaluate(final, batcher, data.x_val, data.y_val, training.eval_batch_size, autocast)
        metrics = {**metrics, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                   "val_acc": val_acc, "gap_loss": val_loss - train_loss, "gap_acc": train_acc - val_acc}
        _adopt(model, final, applied)
    return metrics


def _transformed(a: Applied, x: torch.Tensor, y: torch.Tensor, checked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    result = a.regularizer.transform_batch(x, y, a.params)
    if checked:
        return result
    # the first batch of a trial is checked, so that a broken plugin fails with its name, not deep in torch
    who = f"regularizer {a.regularizer.name!r}: transform_batch"
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result)):
        raise PluginError(f"{who} must return (x, y) tensors; got {type(result).__name__}")
    x2, y2 = result
    if len(x2) != len(y2) or x2.device != x.device:
        raise PluginError(f"{who} returned x {tuple(x2.shape)} on {x2.device} and y {tuple(y2.shape)} for a batch "
                          f"of {len(x)} on {x.device}")
    if not (y2.dtype == torch.long and y2.ndim == 1) and not (y2.is_floating_point() and y2.ndim == 2):
        raise PluginError(f"{who} must return int64 labels (N,) or float probabilities (N, C); got y of dtype "
                          f"{y2.dtype} and shape {tuple(y2.shape)}")
    return result


def _adopt(model: nn.Module, final: nn.Module, applied: Sequence[Applied]) -> None:
    """Load the final model's weights into the model the caller holds (same structure), or say who broke it."""
    try:
        model.load_state_dict(final.state_dict())
    except RuntimeError as exc:
        who = [a.regularizer.name for a in applied if _overrides(a.regularizer, "on_train_end")]
        raise PluginError(f"on_train_end of {', '.join(map(repr, who))} left a model whose weights do not fit the "
                          f"trial's model (it must keep its structure, e.g. AveragedModel.module): {exc}") from None
