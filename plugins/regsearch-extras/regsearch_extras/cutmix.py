"""CutMix: a box of another training image pasted into each image, the targets mixed by the box's area."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import regsearch
from regsearch_extras.targets import probabilities


class CutMix(regsearch.Regularizer):
    """CutMix (image data): each image gets a box of its partner's, area ~ Beta(alpha, alpha); targets mixed by area."""

    def __init__(self, alpha: Any = (0.2, 1.0)) -> None:
        self.alpha = regsearch.parse_range(alpha, "alpha", log=True, minimum=0.0)
        if self.alpha.low <= 0:
            raise ValueError(f"alpha must be above 0; got {alpha!r}")

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"alpha": self.alpha.suggest(trial, "alpha")}

    def transform_model(self, model: nn.Module, params: dict[str, Any]) -> nn.Module:
        shape = tuple(self.context.example_input.shape)
        if len(shape) != 4:
            raise regsearch.ConfigError(f"cutmix needs image inputs (N, C, H, W); this data's inputs have shape "
                                        f"{shape}")
        return model

    def on_train_start(self, state: regsearch.LoopState, params: dict[str, Any]) -> None:
        self.num_classes = state.num_classes

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, params: dict[str, Any]):
        n, _, h, w = x.shape
        alpha = torch.tensor(float(params["alpha"]))
        lam = torch.distributions.Beta(alpha, alpha).sample((n,)).to(x.device)  # one box per image
        cut = (1.0 - lam).sqrt()
        box_h, box_w = (cut * h).round().long(), (cut * w).round().long()
        cy = torch.randint(0, h, (n,), device=x.device)
        cx = torch.randint(0, w, (n,), device=x.device)
        top, bottom = (cy - box_h // 2).clamp(0, h), (cy + box_h - box_h // 2).clamp(0, h)
        left, right = (cx - box_w // 2).clamp(0, w), (cx + box_w - box_w // 2).clamp(0, w)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
        in_cols = (cols >= left[:, None]) & (cols < right[:, None])
        box = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        partner = torch.randperm(n, device=x.device)
        out = torch.where(box, x[partner], x)
        if x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        kept = (1.0 - ((bottom - top) * (right - left)).float() / (h * w))[:, None]  # the box as clipped
        p = probabilities(y, self.num_classes)
        return out, kept * p + (1.0 - kept) * p[partner]
