"""Max-norm constraint on the weights of every Linear/conv unit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import regsearch
from regsearch.surgery import weight_modules


def unit_weights(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """Each Linear/conv weight with the dimension of its output units."""
    found = []
    for _, m in weight_modules(model):
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)  # weight is (in, out, ...)
        found.append((m.weight, 1 if transposed else 0))
    return found


class MaxNorm(regsearch.Regularizer):
    """Max-norm: after every step, rescales each unit's incoming weights (Linear row, conv filter) to L2 norm <= c."""

    def __init__(self, max_norm: Any = (1.0, 5.0)) -> None:
        self.max_norm = regsearch.parse_range(max_norm, "max_norm", log=True, minimum=0.0)

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"max_norm": self.max_norm.suggest(trial, "max_norm")}

    @staticmethod
    def constrain(model: nn.Module, max_norm: float) -> None:
        with torch.no_grad():
            for weight, dim in unit_weights(model):
                weight.renorm_(2, dim, max_norm)

    def on_train_start(self, state: regsearch.LoopState, params: dict[str, Any]) -> None:
        self.constrain(state.model, params["max_norm"])

    def on_batch_end(self, state: regsearch.LoopState, params: dict[str, Any]) -> None:
        self.constrain(state.model, params["max_norm"])
