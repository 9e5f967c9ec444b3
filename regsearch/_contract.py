"""The one set of checks on what a regularizer's hooks return, for preflight, the trainer and `regsearch.testing`.

Each check returns the value when it keeps the contract and raises `PluginError` (its message names the hook, not
the plugin: callers add who) when it does not. `strict` adds what only the plugin test kit insists on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from regsearch._errors import PluginError


def search_space_params(params: Any) -> dict[str, Any]:
    """What `search_space` returned, as the dict the other hooks take."""
    if params is not None and not isinstance(params, Mapping):
        raise PluginError(f"search_space returned {type(params).__name__}, not a dict")
    return dict(params or {})


def transformed_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise PluginError(f"transform_model returned {type(model).__name__}, not an nn.Module")
    return model


def penalty_term(term: Any, device: torch.device, *, strict: bool = False) -> torch.Tensor | None:
    """A penalty: None, or a scalar tensor on the training device (finite and with a gradient, when `strict`)."""
    if term is None:
        return None
    if not isinstance(term, torch.Tensor) or term.numel() != 1 or term.ndim > 1:
        got = tuple(term.shape) if isinstance(term, torch.Tensor) else type(term).__name__
        raise PluginError(f"penalty must return a scalar tensor or None; got {got}")
    if term.device != device:
        raise PluginError(f"penalty returned a tensor on {term.device}, the model trains on {device}")
    if strict and not torch.isfinite(term).all():
        raise PluginError(f"penalty is not finite: {term.item()}")
    if strict and not term.requires_grad:
        raise PluginError("penalty does not depend on the model's parameters (no gradient): it cannot regularize")
    return term.reshape(())


def batch(result: Any, x: torch.Tensor, num_classes: int | None = None, *, strict: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """What `transform_batch` returned for inputs `x`: (x, y) with int64 labels (N,) or probabilities (N, C).

    `strict`: the inputs keep their shape and dtype, and soft targets are probabilities over `num_classes`.
    """
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result)):
        raise PluginError(f"transform_batch must return (x, y) tensors; got {type(result).__name__}")
    x2, y2 = result
    n = len(x) if strict else len(x2)  # outside the kit a plugin may change the batch's size, x and y alike
    hard = y2.dtype == torch.long and y2.shape == (n,)
    soft = (y2.is_floating_point() and y2.ndim == 2 and len(y2) == n
            and (num_classes is None or y2.shape[1] == num_classes))
    if not (hard or soft):
        raise PluginError(f"transform_batch must return int64 labels (N,) or float probabilities (N, C); got y of "
                          f"dtype {y2.dtype} and shape {tuple(y2.shape)} for a batch of {n}")
    if x2.device != x.device or (strict and (x2.shape != x.shape or x2.dtype != x.dtype)):
        raise PluginError(f"transform_batch turned inputs {tuple(x.shape)} {x.dtype} on {x.device} into "
                          f"{tuple(x2.shape)} {x2.dtype} on {x2.device}")
    rows_sum_to_one = soft and torch.allclose(y2.sum(1), torch.ones(len(y2), device=y2.device), atol=1e-4)
    if strict and soft and ((y2 < 0).any() or not rows_sum_to_one):
        raise PluginError("transform_batch returned soft targets that are not probabilities (>= 0, rows sum to 1)")
    return x2, y2


def named(who: str, exc: PluginError) -> PluginError:
    """The same broken rule, said with the plugin's name in front."""
    return PluginError(f"{who}: {exc}")
