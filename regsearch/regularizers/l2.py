"""L2 regularization as optimizer weight decay."""

from __future__ import annotations

from typing import Any

from torch import nn

from regsearch._ranges import parse_range
from regsearch._regularizer import Regularizer


class L2(Regularizer):
    """L2 as optimizer weight_decay (coupled in SGD, decoupled AdamW); biases and 1-d params excluded by default."""

    def __init__(self, weight_decay: Any = (1e-6, 1e-2), exclude_1d: bool = True) -> None:
        self.weight_decay = parse_range(weight_decay, "weight_decay", log=True, minimum=0.0)
        self.exclude_1d = exclude_1d

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"weight_decay": self.weight_decay.suggest(trial, "weight_decay")}

    def param_groups(self, model: nn.Module, params: dict[str, Any], groups: list[dict]) -> list[dict]:
        out = []
        for group in groups:
            decay = [p for p in group["params"] if not (self.exclude_1d and p.ndim <= 1)]
            keep = [p for p in group["params"] if self.exclude_1d and p.ndim <= 1]
            if decay:
                out.append({**group, "params": decay, "weight_decay": params["weight_decay"]})
            if keep:
                out.append({**group, "params": keep, "weight_decay": 0.0})
        return out
