"""Where a trial trains and in what precision: the device, native bfloat16, the autocast dtype of a trial."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
from torch import nn

from regsearch._spec import TrainingSpec
from regsearch.data._tensors import Batcher, TensorData
from regsearch.surgery import watch


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` does bfloat16 arithmetic in hardware: a GPU from Ampere on, a CPU with AVX512-BF16 or AMX.

    Elsewhere bf16 is emulated, many times slower than float32 (BENCHMARKS.md, "Precision").
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
more than the arithmetic saves (BENCHMARKS.md, "Precision")."""


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
