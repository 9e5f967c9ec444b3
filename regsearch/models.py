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


def _resnet(block: Any, input_shape: Sequence[int], num_classes: int, width: Any, depth: Any, stem: Any,
            zero_init_residual: Any, name: str) -> nn.Module:
    from regsearch import _resnet as r

    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image inputs (C, H, W); the data has rows of shape {tuple(input_shape)}")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width must be a whole number >= 1; got {width!r}")
    if stem not in r.STEMS:
        raise ValueError(f"stem must be one of {', '.join(r.STEMS)}; got {stem!r}")
    if not isinstance(zero_init_residual, bool):
        raise ValueError(f"zero_init_residual must be true or false; got {zero_init_residual!r}")
    if stem == "auto":
        stem = "small" if min(input_shape[1:]) <= r.SMALL_STEM_UP_TO else "imagenet"
    return r.ResNet(getattr(r, block), _sizes(depth, "depth"), num_classes, in_channels=input_shape[0],
                    width=width, stem=stem, zero_init_residual=zero_init_residual)


def resnet18(input_shape: Sequence[int], num_classes: int, width: int = 64, depth: Any = (2, 2, 2, 2),
             stem: str = "auto", zero_init_residual: bool = True) -> nn.Module:
    """ResNet-18 in torchvision's layout (its and timm's state dicts load); `stem` small (3x3, no max-pool) or
    imagenet (7x7 stride 2 + max-pool), auto: small up to 64 px; `width` the first stage's channels, `depth` the
    blocks per stage."""
    return _resnet("BasicBlock", input_shape, num_classes, width, depth, stem, zero_init_residual, "resnet18")


def resnet34(input_shape: Sequence[int], num_classes: int, width: int = 64, depth: Any = (3, 4, 6, 3),
             stem: str = "auto", zero_init_residual: bool = True) -> nn.Module:
    """ResNet-34 in torchvision's layout (basic blocks); options as resnet18's."""
    return _resnet("BasicBlock", input_shape, num_classes, width, depth, stem, zero_init_residual, "resnet34")


def resnet50(input_shape: Sequence[int], num_classes: int, width: int = 64, depth: Any = (3, 4, 6, 3),
             stem: str = "auto", zero_init_residual: bool = True) -> nn.Module:
    """ResNet-50 in torchvision's layout (bottleneck blocks, stride on the 3x3 conv); options as resnet18's."""
    return _resnet("Bottleneck", input_shape, num_classes, width, depth, stem, zero_init_residual, "resnet50")


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "resnet18": resnet18,
                                               "resnet34": resnet34, "resnet50": resnet50}


def model_factory(name: str, options: Mapping[str, Any], input_shape: Sequence[int],
                  num_classes: int, searched: Mapping[str, Any] | None = None) -> Callable[..., nn.Module]:
    """A factory for a built-in model, with its options checked now (not in trial 1): of no argument, or of the
    trial where `searched` (the study's searched keys) holds `model.*` keys, each bound and choice checked too."""
    if is_import_path(name):
        build = imported_factory(name, options, input_shape, num_classes)
    elif name not in MODELS:
        raise ConfigError("model.name: " + unknown_name("model", name, MODELS) + "; or an import path "
                          "'package.module:callable'")
    else:
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


def is_import_path(name: str) -> bool:
    """Whether a model name is a factory's import path, `package.module:callable` (Hydra's convention)."""
    return ":" in name


def imported_factory(path: str, options: Mapping[str, Any], input_shape: Sequence[int], num_classes: int
                     ) -> Callable[..., nn.Module]:
    """The callable at `package.module:callable`, bound to the data's `num_classes` (always passed) and, where its
    signature names it, `input_shape` (C, H, W); input channels are the library's own option (timm's `in_chans`)."""
    import importlib
    import inspect

    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model.name: an import path is 'package.module:callable'; got {path!r}")
    if "num_classes" in options:
        raise ConfigError(f"model.num_classes: set from the data ({num_classes} classes); leave it out")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or str(exc)
        if missing == module_name or module_name.startswith(f"{missing}."):
            raise ConfigError(f"model.name: {path!r} does not import: no module named {missing!r} is installed "
                              f"(or on PYTHONPATH)") from None
        raise ConfigError(f"model.name: {path!r} does not import: module {module_name!r} needs {missing!r}, "
                          f"which is not installed") from None
    except Exception as exc:  # a library that is installed but broken here (a wheel built for another torch)
        raise ConfigError(f"model.name: {path!r} does not import: importing {module_name!r} failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"model.name: module {module_name!r} has no {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"model.name: {path} is a {type(factory).__name__}, not a callable that builds a model")
    try:
        takes_shape = "input_shape" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_shape = False
    shape = {"input_shape": tuple(input_shape)} if takes_shape else {}
    return functools.partial(factory, num_classes=num_classes, **shape)
