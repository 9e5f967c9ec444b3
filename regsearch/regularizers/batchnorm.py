"""BatchNorm inserted after Linear/convolution layers."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from regsearch._errors import ConfigError
from regsearch._options import Names
from regsearch._regularizer import Regularizer
from regsearch.surgery import ACTIVATIONS, LAYERS, Site, insert_after, listed, original, select


def batchnorm_for(site: Site) -> nn.Module:
    """BatchNorm1d/2d/3d from the site's output: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)."""
    if site.type_name == "Linear" and site.out_rank != 2:
        raise ConfigError(f"batchnorm: cannot normalise the output of {site.name} (Linear with output shape "
                          f"{site.out_shape}); exclude it")
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(site.out_rank)
    if kind is None:
        raise ConfigError(f"batchnorm: no BatchNorm for the {site.out_rank}-d output of {site.name}")
    return kind(site.out_shape[1])


class BatchNorm(Regularizer):
    """BatchNorm after Linear/conv layers (1d/2d/3d from the layer), before the activation by default."""

    transform_order = -10

    def __init__(self, types: Names = LAYERS, sites: Names = (), exclude: Names = (),
                 position: Literal["before_activation", "after_activation"] = "before_activation",
                 per_site: bool = False) -> None:
        self.types, self.sites, self.exclude = tuple(types), tuple(sites), tuple(exclude)
        self.position, self.per_site = position, per_site

    def candidate_sites(self) -> list[Site]:
        """Chosen layers, except the model's output layer and layers already followed by a BatchNorm."""
        all_sites = self.context.sites
        chosen = select(all_sites, types=self.types, patterns=self.sites, exclude=self.exclude)
        layers = [s for s in all_sites if s.type_name in LAYERS]
        output = layers[-1].name if layers else None
        hidden = [s for s in chosen if s.name != output]
        usable = [s for s in hidden if not (s.next_type or "").startswith("BatchNorm")]
        if not usable:
            asked = ", ".join([*self.types, *self.sites]) or "nothing"
            if hidden:  # every chosen layer has its BatchNorm already (a ResNet, say): nothing left to search
                raise ConfigError(f"no batchnorm site matches {asked} in this model: each of its {len(hidden)} "
                                  f"such layers is already followed by a BatchNorm (set "
                                  f"regularizers.{self.name or 'batchnorm'}.enabled=false)")
            raise ConfigError(f"no batchnorm site matches {asked} in this model (the output layer is never a "
                              f"site); modules: {listed(all_sites)}")
        return usable

    def search_space(self, trial: Any) -> dict[str, Any]:
        sites = self.candidate_sites()
        if self.per_site:
            sites = [s for s in sites if trial.suggest_categorical(f"{s.name}.on", [True, False])]
        return {"sites": [s.name for s in sites]}

    def transform_model(self, model: nn.Module, params: dict[str, Any]) -> nn.Module:
        by_name = {s.name: s for s in self.context.sites}
        for name in params["sites"]:
            site = by_name[name]
            norm = batchnorm_for(site)
            after = name
            if self.position == "after_activation" and site.next_type in ACTIVATIONS:
                after = site.next_name
            else:
                layer = original(model.get_submodule(name))
                if getattr(layer, "bias", None) is not None:
                    # BatchNorm subtracts the mean right after: the layer's bias would be learned for nothing.
                    layer.register_parameter("bias", None)
            model = insert_after(model, after, norm.to(self.context.device))
        return model
