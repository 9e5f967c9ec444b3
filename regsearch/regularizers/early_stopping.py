"""Early stopping on a validation metric, optionally keeping the best epoch's weights."""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Literal

from pydantic import Field

from regsearch._ranges import parse_range
from regsearch._regularizer import LoopState, Regularizer

MONITORS = {"val_acc": 1.0, "val_loss": -1.0}
"""Metric -> +1 where higher is better, -1 where lower is."""


class EarlyStopping(Regularizer):
    """Ends training after `patience` epochs without a better val_acc (or val_loss); restore_best keeps the best epoch.

    Better means by more than `min_delta`; with `restore_best`, the trial's model and metrics are its best epoch's."""

    def __init__(self, patience: Any = (3, 10), min_delta: Annotated[float, Field(ge=0.0)] = 0.0,
                 monitor: Literal["val_acc", "val_loss"] = "val_acc", restore_best: bool = False) -> None:
        self.patience = parse_range(patience, "patience", integer=True, minimum=1)
        self.min_delta, self.monitor, self.restore_best = float(min_delta), monitor, restore_best

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"patience": self.patience.suggest(trial, "patience")}

    def on_train_start(self, state: LoopState, params: dict[str, Any]) -> None:
        self.best = -math.inf
        self.waited = 0
        self.best_weights = None

    def on_epoch_end(self, state: LoopState, params: dict[str, Any]) -> None:
        score = MONITORS[self.monitor] * state.metrics[self.monitor]
        if score > self.best + self.min_delta:
            self.best, self.waited = score, 0
            if self.restore_best:
                self.best_weights = copy.deepcopy(state.model.state_dict())
            return
        self.waited += 1
        if self.waited >= params["patience"]:
            state.stop = True

    def on_train_end(self, state: LoopState, params: dict[str, Any]) -> None:
        if self.restore_best and self.best_weights is not None and self.waited > 0:
            best = copy.deepcopy(state.model)
            best.load_state_dict(self.best_weights)
            state.model = best  # the trainer evaluates it again and makes it the trial's model
        self.best_weights = None
