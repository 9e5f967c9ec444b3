"""Stochastic depth: residual branches dropped per example, at a rate rising linearly with depth."""

from __future__ import annotations

from typing import Any

from torch import nn

from regsearch._errors import ConfigError
from regsearch._ranges import parse_range
from regsearch._regularizer import Regularizer


def drop_path_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules holding a residual branch's drop rate (a numeric `drop_prob`: the built-in ResNets' `drop_path`,
    timm's `DropPath`), in the model's module order, which is depth order. timm's DropBlock has one too and is no
    residual branch."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "drop_prob", None), (int, float)) and not isinstance(m.drop_prob, bool)
            and not type(m).__name__.startswith("DropBlock")]


def linear_rates(rate: float, n: int) -> list[float]:
    """rate * (i + 1) / n for block i of n: the deepest block is dropped at `rate`, the first at rate / n."""
    return [rate * (i + 1) / n for i in range(n)]


class DropPath(Regularizer):
    """Stochastic depth (Huang et al. 2016): each residual branch dropped per example, linear rate over depth."""

    def __init__(self, rate: Any = (0.05, 0.3)) -> None:
        self.rate = parse_range(rate, "rate", minimum=0.0, maximum=1.0, maximum_open=True)

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"rate": self.rate.suggest(trial, "rate")}

    def transform_model(self, model: nn.Module, params: dict[str, Any]) -> nn.Module:
        sites = drop_path_modules(model)
        if not sites:
            raise ConfigError(f"drop_path needs residual branches: the model ({type(model).__name__}) has no module "
                              f"with a drop_prob (the built-in resnet18/34/50 have them; timm's models when created "
                              f"with drop_path_rate > 0)")
        for (_, module), rate in zip(sites, linear_rates(float(params["rate"]), len(sites))):
            module.drop_prob = rate
        return model
