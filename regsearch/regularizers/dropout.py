"""Dropout placed after chosen modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from regsearch._errors import ConfigError
from regsearch._regularizer import Regularizer
from regsearch._spec import parse_range
from regsearch.surgery import ACTIVATIONS, Site, insert_after, select


def _as_names(value: Any, option: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{option} must be a list of names; got {value!r}")
    return tuple(value)


def dropout_for(site: Site, p: float) -> nn.Module:
    """Channel dropout after convolution feature maps, element dropout elsewhere."""
    if site.type_name == "Conv1d":
        return nn.Dropout1d(p)
    return {4: nn.Dropout2d, 5: nn.Dropout3d}.get(site.out_rank, nn.Dropout)(p)


class Dropout(Regularizer):
    """Dropout after chosen modules (by type and/or name pattern), per-site or shared rate; never before BatchNorm."""

    def __init__(self, types: Any = ACTIVATIONS, sites: Any = (), exclude: Any = (), per_site: bool = False,
                 p: Any = (0.0, 0.5)) -> None:
        self.types = _as_names(types, "types")
        self.sites = _as_names(sites, "sites")
        self.exclude = _as_names(exclude, "exclude")
        if not isinstance(per_site, bool):
            raise ValueError(f"per_site must be true or false; got {per_site!r}")
        self.per_site = per_site
        self.p = parse_range(p, "p", minimum=0.0, maximum=1.0, maximum_open=True)

    def candidate_sites(self) -> list[Site]:
        """The traced sites this plugin may place dropout after (not the output, not right before a BatchNorm)."""
        chosen = select(self.context.sites, types=self.types, patterns=self.sites, exclude=self.exclude)
        usable = [s for s in chosen if s.next_name is not None and not (s.next_type or "").startswith("BatchNorm")]
        if not usable:
            asked = ", ".join([*self.types, *self.sites]) or "nothing"
            raise ConfigError(f"no dropout site matches {asked} in this model (sites must not be the output "
                              f"layer or directly before a BatchNorm); modules: "
                              f"{', '.join(f'{s.name} ({s.type_name})' for s in self.context.sites)}")
        return usable

    def search_space(self, trial: Any) -> dict[str, Any]:
        sites = self.candidate_sites()
        if not self.per_site:
            p = self.p.suggest(trial, "p")
            return {"rates": {s.name: p for s in sites}}
        rates = {}
        for site in sites:
            if trial.suggest_categorical(f"{site.name}.on", [True, False]):
                rates[site.name] = self.p.suggest(trial, f"{site.name}.p")
        return {"rates": rates}

    def transform_model(self, model: nn.Module, params: dict[str, Any]) -> nn.Module:
        by_name = {s.name: s for s in self.context.sites}
        for name, p in params["rates"].items():
            if p > 0:
                model = insert_after(model, name, dropout_for(by_name[name], p))
        return model
