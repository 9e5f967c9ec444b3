"""Model surgery by module name and type: find sites by tracing one forward pass, insert modules after them.

Sites are named as in the model the user wrote (``features.3``, ``classifier.0``). Inserting a module after a
site replaces the site by a `Chain` whose first child is the original module, so every name of the original
model still resolves to its site, and later insertions after the same site append to that chain.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = ("ReLU", "ReLU6", "GELU", "SiLU", "ELU", "LeakyReLU", "Tanh", "Sigmoid", "Mish", "Hardswish")
LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d")


class Chain(nn.Sequential):
    """A site followed by the modules regularizers inserted after it (child 0 is the original module)."""


@dataclass(frozen=True)
class Site:
    """A leaf module of the model as one forward pass saw it."""

    name: str
    type_name: str
    out_shape: tuple[int, ...]
    next_name: str | None
    next_type: str | None

    @property
    def out_rank(self) -> int:
        return len(self.out_shape)


def watch(model: nn.Module, example: torch.Tensor, hooks: Mapping[nn.Module, Callable[..., None]]) -> None:
    """One forward pass of `example` in eval mode without gradients, each of `hooks` (module: forward hook)
    attached meanwhile; the model is left as it was (nothing learnt, BatchNorm's statistics kept, no hook)."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def trace(model: nn.Module, example: torch.Tensor) -> list[Site]:
    """The leaf modules in the order one forward pass (eval mode, no grad) runs them, with output shapes."""
    leaves = {name: m for name, m in model.named_modules() if name and not any(True for _ in m.children())}
    order: list[tuple[str, str, tuple[int, ...]]] = []
    seen: set[str] = set()

    def hook(name: str):
        def record(module: nn.Module, args: object, output: object) -> None:
            if name not in seen and isinstance(output, torch.Tensor):
                seen.add(name)
                order.append((name, type(module).__name__, tuple(output.shape)))
        return record

    watch(model, example, {m: hook(name) for name, m in leaves.items()})
    sites = []
    for i, (name, type_name, shape) in enumerate(order):
        nxt = order[i + 1] if i + 1 < len(order) else None
        sites.append(Site(name, type_name, shape, nxt[0] if nxt else None, nxt[1] if nxt else None))
    return sites


def select(sites: Sequence[Site], *, types: Iterable[str] = (), patterns: Iterable[str] = (),
           exclude: Iterable[str] = ()) -> list[Site]:
    """Sites whose type is in `types` or whose name matches one of the glob `patterns`, minus `exclude`."""
    types, patterns, exclude = set(types), list(patterns), list(exclude)
    chosen = [s for s in sites if s.type_name in types or any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    return [s for s in chosen if not any(fnmatch.fnmatchcase(s.name, p) for p in exclude)]


MODULES_SHOWN = 12
"""How many of a model's modules a no-site error lists; a ResNet has dozens."""


def listed(sites: Sequence[Site]) -> str:
    """The sites as `name (Type)` for an error message: the first MODULES_SHOWN, then how many more."""
    shown = ", ".join(f"{s.name} ({s.type_name})" for s in sites[:MODULES_SHOWN])
    return shown + (f" and {len(sites) - MODULES_SHOWN} more" if len(sites) > MODULES_SHOWN else "")


def insert_after(model: nn.Module, site: str, module: nn.Module) -> nn.Module:
    """Insert `module` right after the module named `site`; returns the (same) root model."""
    target = model.get_submodule(site)
    if isinstance(target, Chain):
        target.append(module)
        return model
    chain = Chain(target, module)
    if not site:
        return chain
    parent_name, _, child = site.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, chain)
    return model


def original(module: nn.Module) -> nn.Module:
    """The user's module at a site, looking through a `Chain`."""
    return module[0] if isinstance(module, Chain) else module


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear and convolution modules of a model (where weights, not biases or norms, live)."""
    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
