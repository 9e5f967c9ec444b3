"""Cutout: a random square of each training image set to zero."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import regsearch


class Cutout(regsearch.Regularizer):
    """Cutout (image data): zeroes one random square per training image, side = size x the image's shorter side."""

    def __init__(self, size: Any = (0.2, 0.6)) -> None:
        self.size = regsearch.parse_range(size, "size", minimum=0.0, maximum=1.0)
        if self.size.low <= 0:
            raise ValueError(f"size must be above 0 (a fraction of the image side); got {size!r}")

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"size": self.size.suggest(trial, "size")}

    def transform_model(self, model: nn.Module, params: dict[str, Any]) -> nn.Module:
        shape = tuple(self.context.example_input.shape)
        if len(shape) != 4:
            raise regsearch.ConfigError(f"cutout needs image inputs (N, C, H, W); this data's inputs have shape "
                                        f"{shape}")
        return model

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, params: dict[str, Any]):
        # x is normalised: zero is the training set's mean colour, as in the original Cutout
        n, _, h, w = x.shape
        side = max(1, round(params["size"] * min(h, w)))
        top = torch.randint(0, h - side + 1, (n, 1), device=x.device)
        left = torch.randint(0, w - side + 1, (n, 1), device=x.device)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_rows = (rows >= top) & (rows < top + side)
        in_cols = (cols >= left) & (cols < left + side)
        square = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        return x.masked_fill(square, 0.0), y
