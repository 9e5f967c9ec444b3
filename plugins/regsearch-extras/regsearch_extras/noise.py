"""Gaussian noise on the inputs and/or the weights during training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import regsearch
from regsearch_extras.max_norm import unit_weights


def _std(value: Any, where: str) -> regsearch.Range:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return regsearch.parse_range(value, where)  # 0: this kind of noise is off
    return regsearch.parse_range(value, where, log=True, minimum=0.0)


class GaussianNoise(regsearch.Regularizer):
    """Gaussian noise: input_std on the (normalised) inputs, weight_std x RMS on the weights per step (0 = off)."""

    def __init__(self, input_std: Any = (0.01, 0.3), weight_std: Any = 0.0) -> None:
        self.input_std = _std(input_std, "input_std")
        self.weight_std = _std(weight_std, "weight_std")
        if self.input_std.high == 0 and self.weight_std.high == 0:
            raise ValueError("input_std and weight_std are both 0: there is no noise to add")

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"input_std": self.input_std.suggest(trial, "input_std"),
                "weight_std": self.weight_std.suggest(trial, "weight_std")}

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, params: dict[str, Any]):
        if params["input_std"] > 0:
            x = x + params["input_std"] * torch.randn_like(x)
        return x, y

    # Weight noise (Graves 2011): the forward pass and its gradient see noisy weights, the optimizer steps from the
    # clean ones. Noise goes in before a training forward pass and comes out just before the optimizer step, so
    # evaluation (and every copy another plugin takes between steps) sees clean weights.

    def on_train_start(self, state: regsearch.LoopState, params: dict[str, Any]) -> None:
        self.noise: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = []
        if params["weight_std"] > 0:
            self.model, self.std = state.model, params["weight_std"]
            self.handles = [state.model.register_forward_pre_hook(self._add),
                            state.optimizer.register_step_pre_hook(self._remove)]

    def _add(self, module: nn.Module, args: Any) -> None:
        if module is not self.model or not module.training or self.noise:
            return  # a copy of the model (SWA), evaluation, or noise already in
        with torch.no_grad():
            for weight, _ in unit_weights(module):
                rms = weight.pow(2).mean().sqrt()
                noise = torch.randn_like(weight) * (self.std * rms)
                weight.add_(noise)
                self.noise.append((weight, noise))

    def _remove(self, *args: Any) -> None:
        with torch.no_grad():
            for weight, noise in self.noise:
                weight.sub_(noise)
        self.noise = []

    def on_train_end(self, state: regsearch.LoopState, params: dict[str, Any]) -> None:
        self._remove()
        for handle in self.handles:
            handle.remove()
        self.handles, self.model = [], None
