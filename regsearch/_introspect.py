"""Describing a regularizer's search space without a study (for `regsearch plugins`)."""

from __future__ import annotations

import torch
from torch import nn

from regsearch._registry import RegularizerInfo
from regsearch._regularizer import NamespacedTrial, TrialContext
from regsearch.surgery import trace


def _example_context() -> TrialContext:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    example = torch.zeros(2, 8)
    return TrialContext(example_input=example, device=torch.device("cpu"), trial_number=0, seed=0, model=model,
                        sites=trace(model, example))


def search_space_lines(info: RegularizerInfo) -> list[str]:
    """'name: distribution' lines of a regularizer with default options, on a small example MLP."""
    from regsearch._search_space import RecordingTrial

    try:
        reg = info.cls()
        reg.context = _example_context()
        recorder = RecordingTrial()
        reg.search_space(NamespacedTrial(recorder, info.name))
    except Exception as exc:  # a listing must not fail on a plugin that needs options or an image model
        return [f"(search space depends on its options or the model: {type(exc).__name__}: {exc})"]
    lines = [f"{info.name}.enabled: on/off switch (unless the study sets enabled: true)"]
    for name, dist in recorder.distributions.items():
        lines.append(f"{name}: {_describe(dist)}")
    return lines


def _describe(dist) -> str:
    import optuna

    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return "one of " + ", ".join(map(str, dist.choices))
    kind = "int" if isinstance(dist, optuna.distributions.IntDistribution) else "float"
    return f"{kind} in [{dist.low:g}, {dist.high:g}]" + (" log" if dist.log else "")
