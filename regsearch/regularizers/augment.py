"""Data augmentation as a regularizer: batched random flip and translate of training images."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from regsearch._errors import ConfigError
from regsearch._ranges import parse_range
from regsearch._regularizer import Regularizer
from regsearch.data._tensors import flip_translate


class Augment(Regularizer):
    """Random horizontal flip and a shift of up to `translate` pixels, a whole batch at once (image data)."""

    batch_order: ClassVar[int] = -10  # geometric augmentation comes before cutout, mixing and noise

    def __init__(self, translate: Any = 4, flip: bool = True) -> None:
        self.translate = parse_range(translate, "translate", minimum=0, integer=True)
        self.flip = flip

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {"translate": self.translate.suggest(trial, "translate")}

    def transform_model(self, model: torch.nn.Module, params: dict[str, Any]) -> torch.nn.Module:
        shape = tuple(self.context.example_input.shape)
        if len(shape) != 4:
            raise ConfigError(f"augment needs image inputs (N, C, H, W); this data's inputs have shape {shape}")
        return model

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, params: dict[str, Any]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        # x is normalised, so the shifted-in border is the training set's mean colour
        out = flip_translate(x, pad=int(params["translate"]), flip=self.flip)
        if x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out, y
