"""The optimizer a trial trains with (from the regularizers' parameter groups) and its learning-rate schedule."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from regsearch._regularizer import Applied
from regsearch._spec import TrainingSpec

_CPU_FUSED = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)
"""torch has fused SGD and AdamW steps for CPU tensors from 2.4 on."""


def _fusable(model: nn.Module, groups: list[dict]) -> bool:
    """One fused kernel per step instead of a few per parameter group, where torch has one for every parameter.

    Small networks wait on kernel launches (BENCHMARKS.md); fused steps take no sparse gradients
    (`sparse=True` embeddings).
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


def schedule(optimizer: torch.optim.Optimizer, training: TrainingSpec, lr: float, total_steps: int):
    if training.schedule == "onecycle":
        # OneCycleLR divides by zero when pct_start * total_steps == 1 (4 steps in all at 0.25)
        pct_start = 0.25 if total_steps * 0.25 != 1 else 0.5
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                   pct_start=pct_start, cycle_momentum=False)
    if training.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None
