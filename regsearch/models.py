"""Built-in model factories: plain networks without any regularization (the plugins add it)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from regsearch._errors import ConfigError, unknown_name
from regsearch._options import call_with_options


def _sizes(value: Any, option: str) -> tuple[int, ...]:
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"{option} must be a list of positive whole numbers; got {value!r}")
    return tuple(value)


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Any = (256, 256)) -> nn.Module:
    """A multilayer perceptron: Flatten, then Linear + ReLU per hidden width, then a Linear classifier."""
    widths = _sizes(hidden, "hidden")
    layers: list[nn.Module] = [nn.Flatten()]
    inputs = math.prod(input_shape)
    for width in widths:
        layers += [nn.Linear(inputs, width), nn.ReLU()]
        inputs = width
    layers.append(nn.Linear(inputs, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: Sequence[int], num_classes: int, channels: Any = (32, 64, 128), hidden: int = 256) -> nn.Module:
    """A small VGG-style CNN: per stage a 3x3 conv + ReLU + 2x2 max-pool, then a hidden Linear layer."""
    stages = _sizes(channels, "channels")
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs image inputs (C, H, W); the data has rows of shape {tuple(input_shape)}")
    c, h, w = input_shape
    if h >> len(stages) == 0 or w >> len(stages) == 0:
        raise ValueError(f"{len(stages)} pooling stages are too many for {h}x{w} images")
    features: list[nn.Module] = []
    for out in stages:
        features += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = out
    flat = c * (h >> len(stages)) * (w >> len(stages))
    return nn.Sequential(
        nn.Sequential(*features),
        nn.Sequential(nn.Flatten(), nn.Linear(flat, _sizes(hidden, "hidden")[0]), nn.ReLU(),
                      nn.Linear(hidden, num_classes)),
    )


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]


class Residual(nn.Module):
    """x + body(x), with body two 3x3 conv + ReLU blocks."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_block(channels, channels), *_conv_block(channels, channels))

    def forward(self, x):
        return x + self.body(x)


def resnet(input_shape: Sequence[int], num_classes: int, width: int = 64) -> nn.Module:
    """A ResNet-9-style network (prep, three stages with two residual blocks) sized by `width`."""
    if len(input_shape) != 3:
        raise ValueError(f"resnet needs image inputs (C, H, W); the data has rows of shape {tuple(input_shape)}")
    if not isinstance(width, int) or isinstance(width, bool) or width < 4:
        raise ValueError(f"width must be a whole number >= 4; got {width!r}")
    w1, w2, w3 = width, 2 * width, 4 * width

    return nn.Sequential(
        nn.Sequential(*_conv_block(input_shape[0], w1)),
        nn.Sequential(*_conv_block(w1, w2), nn.MaxPool2d(2), Residual(w2)),
        nn.Sequential(*_conv_block(w2, w3), nn.MaxPool2d(2)),
        nn.Sequential(*_conv_block(w3, w3), nn.MaxPool2d(2), Residual(w3)),
        nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes)),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet": resnet}


def model_factory(name: str, options: Mapping[str, Any], input_shape: Sequence[int],
                  num_classes: int, searched: Mapping[str, Any] | None = None) -> Callable[..., nn.Module]:
    """A factory for a built-in model, with its options checked now (not in trial 1): of no argument, or of the
    trial where `searched` (the study's searched keys) holds `model.*` keys, each bound and choice checked too."""
    if name not in MODELS:
        raise ConfigError("model.name: " + unknown_name("model", name, MODELS))
    build = functools.partial(MODELS[name], tuple(input_shape), num_classes)
    call_with_options(build, options, "model", name)
    space = {key.split(".", 1)[1]: s for key, s in (searched or {}).items() if key.startswith("model.")}
    for key, s in space.items():
        for value in s.values():
            call_with_options(build, {**options, key: value}, f"model.{key}", name)
    if space:
        return functools.partial(_searched_model, functools.partial(build, **options), space)
    return functools.partial(build, **options)


def _searched_model(build: Callable[..., nn.Module], space: Mapping[str, Any], trial: Any) -> nn.Module:
    """A built-in model with the trial's values of its searched options (`trial` names them under `model.`)."""
    return build(**{key: s.suggest(trial, key) for key, s in space.items()})
