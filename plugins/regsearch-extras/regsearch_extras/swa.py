"""Stochastic weight averaging over the last epochs."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import swa_utils

import regsearch


class SWA(regsearch.Regularizer):
    """SWA: averages the weights of the epochs after `start` x epochs; BatchNorm statistics recomputed at the end."""

    def __init__(self, start: Any = (0.5, 0.9)) -> None:
        self.start = regsearch.parse_range(start, "start", minimum=0.0, maximum=1.0, maximum_open=True)

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"start": self.start.suggest(trial, "start")}

    @staticmethod
    def first_epoch(start: float, epochs: int) -> int:
        """The first epoch whose weights join the average (the last epoch always does)."""
        return min(epochs, math.floor(start * epochs) + 1)

    def on_train_start(self, state: regsearch.LoopState, params: dict[str, Any]) -> None:
        self.averaged = None

    def on_epoch_end(self, state: regsearch.LoopState, params: dict[str, Any]) -> None:
        if state.epoch < self.first_epoch(params["start"], state.epochs):
            return
        if self.averaged is None:
            self.averaged = swa_utils.AveragedModel(state.model)
        self.averaged.update_parameters(state.model)

    def on_train_end(self, state: regsearch.LoopState, params: dict[str, Any]) -> None:
        if self.averaged is None:  # stopped (early stopping, pruning) before averaging began
            return
        final = self.averaged.module
        swa_utils.update_bn(state.batches(), final)  # averaged weights need their own BatchNorm statistics
        state.model = final
        self.averaged = None
