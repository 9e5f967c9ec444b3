"""Regularizers that train on soft targets: label smoothing and mixup."""

from __future__ import annotations

from typing import Any

import torch

import regsearch


def probabilities(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C) class probabilities from int labels, or the soft targets an earlier plugin made, as they are."""
    if y.is_floating_point():
        return y
    return torch.nn.functional.one_hot(y, num_classes).float()


class LabelSmoothing(regsearch.Regularizer):
    """Label smoothing: trains on (1-eps)*one-hot + eps/C targets; evaluation loss is plain cross-entropy."""

    def __init__(self, smoothing: Any = (0.01, 0.3)) -> None:
        self.smoothing = regsearch.parse_range(smoothing, "smoothing", minimum=0.0, maximum=1.0, maximum_open=True)

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"smoothing": self.smoothing.suggest(trial, "smoothing")}

    def on_train_start(self, state: regsearch.LoopState, params: dict[str, Any]) -> None:
        self.num_classes = state.num_classes

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, params: dict[str, Any]):
        p = probabilities(y, self.num_classes)
        eps = params["smoothing"]
        return x, p * (1.0 - eps) + eps / p.shape[1]


class Mixup(regsearch.Regularizer):
    """Mixup: trains on convex mixes of pairs of examples and of their targets, weight ~ Beta(alpha, alpha)."""

    def __init__(self, alpha: Any = (0.1, 1.0)) -> None:
        self.alpha = regsearch.parse_range(alpha, "alpha", log=True, minimum=0.0)
        if self.alpha.low <= 0:
            raise ValueError(f"alpha must be above 0; got {alpha!r}")

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"alpha": self.alpha.suggest(trial, "alpha")}

    def on_train_start(self, state: regsearch.LoopState, params: dict[str, Any]) -> None:
        self.num_classes = state.num_classes

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, params: dict[str, Any]):
        alpha = torch.tensor(float(params["alpha"]))
        lam = torch.distributions.Beta(alpha, alpha).sample().item()  # one weight per batch, as in the paper
        partner = torch.randperm(len(x), device=x.device)
        p = probabilities(y, self.num_classes)
        return lam * x + (1.0 - lam) * x[partner], lam * p + (1.0 - lam) * p[partner]
