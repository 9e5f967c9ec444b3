"""Fine-tuning from a local weights file: read it (never download), load it into each trial's model with the
classifier replaced for the data's classes, and keep the backbone frozen for the first epochs."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regsearch._errors import ConfigError
from regsearch._regularizer import LoopState, Regularizer

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_NESTED = ("state_dict", "model", "model_state_dict")
"""Keys under which training scripts commonly nest the state dict in a checkpoint."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or a `.pth`/`.pt`/`.bin` state dict (torch.load, weights_only)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model.weights: {path} does not exist" if not file.exists()
                          else f"model.weights: {path} is not a file")
    if file.suffix not in SUFFIXES:
        raise ConfigError(f"model.weights: {path}: expected a {', '.join(SUFFIXES)} file")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError("model.weights: reading .safetensors needs the package safetensors "
                              "(pip install safetensors), or give a .pth state dict") from None
        try:
            return load_file(str(file), device="cpu")
        except Exception as exc:
            raise ConfigError(f"model.weights: {path} is not a readable safetensors file: {_first_line(exc)}") from None
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.weights: {path} is not a state dict torch can load safely (weights_only): "
                          f"{_first_line(exc)}") from None
    return _tensors(raw, path)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _tensors(raw: Any, path: str) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping of a loaded checkpoint (nested under `state_dict`/`model`, or a `module.` prefix
    from DataParallel, taken off)."""
    if isinstance(raw, Mapping):
        nested = next((raw[k] for k in _NESTED if isinstance(raw.get(k), Mapping)), None)
        if nested is not None:
            raw = nested
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConfigError(f"model.weights: {path} holds a {type(raw).__name__}, not a state dict (name -> tensor)")
    if all(str(k).startswith("module.") for k in raw):
        return {str(k)[len("module."):]: v for k, v in raw.items()}
    return {str(k): v for k, v in raw.items()}


def classifier(model: nn.Module) -> str | None:
    """The name of the model's classifier: its last Linear module (`fc` in a ResNet), or None without one."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: str) -> nn.Module:
    """`model` with the file's tensors, every name and shape matched, except a classifier whose shape differs (the
    data has other classes: the model's new one stays) and BatchNorm counters a file may lack."""
    own = model.state_dict()
    head = classifier(model)
    head_keys = {f"{head}.weight", f"{head}.bias"} if head is not None else set()
    missing = [k for k in own if k not in tensors and k not in head_keys and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        parts = [f"{len(names)} tensor{'s' * (len(names) > 1)} {what} ({_some(names)})" for what, names in
                 (("missing from the file", missing), ("in the file but not in the model", unexpected)) if names]
        raise ConfigError(f"model.weights: {path} does not fit the model ({type(model).__name__}): "
                          + "; ".join(parts))
    chosen = {}
    for name, value in own.items():
        if name not in tensors:
            continue
        theirs = tensors[name]
        if theirs.shape != value.shape:
            if name in head_keys:
                continue
            stem = name == "conv1.weight" and theirs.shape[2:] != value.shape[2:]
            hint = " (is model.stem right for these weights?)" if stem else ""
            raise ConfigError(f"model.weights: {path}: {name} is {list(theirs.shape)} in the file but "
                              f"{list(value.shape)} in the model{hint}")
        chosen[name] = theirs
    model.load_state_dict(chosen, strict=False)
    return model


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f", ... {len(names) - shown} more" if len(names) > shown else "")


def pretrained(build: Callable[..., nn.Module], path: str, takes_trial: bool) -> Callable[..., nn.Module]:
    """The model factory `build` (of the trial where `takes_trial`, else of no argument) whose every model starts
    from the weights at `path`; the file is read once, here."""
    tensors = read_state_dict(path)
    if takes_trial:
        return functools.partial(_loaded_for_trial, build, tensors, path)
    return functools.partial(_loaded, build, tensors, path)


def _loaded(build: Callable[[], nn.Module], tensors: Mapping[str, torch.Tensor], path: str) -> nn.Module:
    return load_weights(build(), tensors, path)


def _loaded_for_trial(build: Callable[[Any], nn.Module], tensors: Mapping[str, torch.Tensor], path: str,
                      trial: Any) -> nn.Module:
    return load_weights(build(trial), tensors, path)


class FrozenBackbone(Regularizer):
    """`model.freeze_epochs`: the backbone (everything but the classifier) learns nothing in the first `epochs`
    epochs: no gradient (so no update, momentum or decay) and BatchNorm statistics held. A model option riding the
    training loop's epoch events, not a searched regularizer."""

    name = "model.freeze_epochs"

    def __init__(self, model: nn.Module, epochs: int) -> None:
        head = classifier(model)
        head_params = set(model.get_submodule(head).parameters()) if head is not None else set()
        self.params = [p for p in model.parameters() if p not in head_params]
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.momenta = [m.momentum for m in self.norms]
        self.epochs = epochs

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {}

    def _freeze(self, frozen: bool) -> None:
        for p in self.params:
            p.requires_grad_(not frozen)
        for m, momentum in zip(self.norms, self.momenta):
            m.momentum = 0.0 if frozen else momentum  # 0: running statistics stay as loaded

    def on_epoch_start(self, state: LoopState, params: dict[str, Any]) -> None:
        frozen = state.epoch <= self.epochs
        if not frozen and state.epoch == self.epochs + 1:
            _start_momentum(state.optimizer, self.params)
        self._freeze(frozen)

    def on_train_end(self, state: LoopState, params: dict[str, Any]) -> None:
        self._freeze(False)


def _start_momentum(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Zero SGD momentum buffers for parameters that had no gradient so far: torch's own first step for them (the
    buffer becomes the gradient), and fused SGD, which takes buffers for all parameters of a step or for none,
    can go on."""
    chosen = set(params)
    for group in optimizer.param_groups:
        if not isinstance(optimizer, torch.optim.SGD) or not group.get("momentum"):
            continue
        for p in group["params"]:
            if p in chosen and optimizer.state[p].get("momentum_buffer") is None:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
