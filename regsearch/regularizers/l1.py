"""L1 penalty on weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from regsearch._ranges import parse_range
from regsearch._regularizer import Regularizer
from regsearch.surgery import weight_modules


class L1(Regularizer):
    """L1 loss term strength*sum|w| over Linear/conv weights (not biases or norm parameters); log-scale strength."""

    def __init__(self, strength: Any = (1e-6, 1e-3)) -> None:
        self.strength = parse_range(strength, "strength", log=True, minimum=0.0)

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"strength": self.strength.suggest(trial, "strength")}

    def penalty(self, model: nn.Module, params: dict[str, Any]) -> torch.Tensor | None:
        weights = [m.weight for _, m in weight_modules(model)]
        if not weights:
            return None
        return params["strength"] * torch.stack([w.abs().sum() for w in weights]).sum()
