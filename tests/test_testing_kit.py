"""regsearch.testing: the built-ins pass the plugin authors' contract kit, and broken plugins fail it clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import regsearch
from regsearch import RegularizerRegistry
from regsearch.testing import check_regularizer, contract_tests


def _builtins():
    registry = RegularizerRegistry()
    registry.load_entry_points(third_party=False)
    return [info.cls for info in registry]


test_builtins_pass_the_contract = contract_tests(*_builtins(), (regsearch.default_registry().get("dropout").cls,
                                                                  {"per_site": True, "p": [0.1, 0.5]}))


class Good(regsearch.Regularizer):
    """A well-behaved plugin the broken ones below are variations of."""

    def search_space(self, trial):
        return {"scale": trial.suggest_float("scale", 0.1, 1.0)}


class NoDoc(regsearch.Regularizer):
    def search_space(self, trial):
        return {}


class SuggestsEnabled(Good):
    """Takes the framework's switch name."""

    def search_space(self, trial):
        return {"on": trial.suggest_categorical("enabled", [True, False])}


class Outside(Good):
    """Suggests on the raw trial behind the namespaced view."""

    def search_space(self, trial):
        return {"scale": trial._trial.suggest_float("scale", 0.1, 1.0)}


class AlwaysNoisy(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)


class NoisyInEval(Good):
    """Adds noise in eval mode too."""

    def transform_model(self, model, params):
        return nn.Sequential(AlwaysNoisy(), model)


class Centre(nn.Module):
    def forward(self, x):
        return x - x.mean(0)


class BatchStatsInEval(Good):
    """Centres with the batch's mean even in eval mode."""

    def transform_model(self, model, params):
        return nn.Sequential(Centre(), model)


class Crashes(Good):
    """Its hook raises."""

    def on_epoch_end(self, state, params):
        raise KeyError("val_accuracy")


class VectorPenalty(Good):
    """Returns one penalty per weight tensor."""

    def penalty(self, model, params):
        return torch.stack([p.abs().sum() for p in model.parameters()])


class ConstantPenalty(Good):
    """A penalty that ignores the model."""

    def penalty(self, model, params):
        return torch.tensor(1.0)


class DropsARow(Good):
    """Returns fewer labels than inputs."""

    def transform_batch(self, x, y, params):
        return x, y[1:]


class ImproperTargets(Good):
    """Soft targets that do not sum to one."""

    def transform_batch(self, x, y, params):
        return x, torch.ones(len(x), 3)


class Remembers(Good):
    """Early stopping that forgets to reset its counter between trials."""

    waited = 0

    def on_epoch_end(self, state, params):
        self.waited += 1
        state.stop = self.waited >= 4


class BadSignature(Good):
    """on_batch_end without params."""

    def on_batch_end(self, state):
        pass


class ImagesOnly(Good):
    """Refuses flat data; accepted since it works on images."""

    def transform_model(self, model, params):
        if self.context.example_input.ndim != 4:
            raise regsearch.ConfigError("needs images")
        return model


class Refuses(Good):
    """Refuses every model."""

    def transform_model(self, model, params):
        raise regsearch.ConfigError("no site here")


@pytest.mark.parametrize("cls, message", [
    (NoDoc, r"'no_doc' .*has no class docstring"),
    (SuggestsEnabled, r"suggests 'suggests_enabled\.enabled', the framework's on/off switch"),
    (Outside, r"suggested \['scale'\] outside its namespace 'outside'"),
    (NoisyInEval, r"after transform_model the model is random in eval mode"),
    (BatchStatsInEval, r"eval-mode output depends on the rest of the batch"),
    (VectorPenalty, r"penalty must return a scalar tensor or None; got \(\d+,\)"),
    (ConstantPenalty, r"penalty does not depend on the model's parameters"),
    (DropsARow, r"transform_batch must return int64 labels \(N,\) or float probabilities"),
    (ImproperTargets, r"soft targets that are not probabilities"),
    (Remembers, r"a trial repeated with the same instance after another trial ended differently"),
    (BadSignature, r"BadSignature\.on_batch_end\(self, state\) does not take \(self, state, params\)"),
    (Crashes, r"'crashes' .*training_hooks check: KeyError: 'val_accuracy'"),
    (Refuses, r"refuses every model of the kit \(a small MLP, a small CNN, a small ResNet\): flat: no site here; "
              r"image: no site here; residual: no site here"),
])
def test_a_broken_plugin_fails_the_kit_naming_the_rule(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_regularizer(cls)


def test_a_plugin_may_refuse_one_kind_of_data_and_the_options_reach_the_constructor():
    check_regularizer(ImagesOnly)
    with pytest.raises(AssertionError, match=r"'l1' .*constructor refused options \{'strength': \[0, 1\]\}"):
        check_regularizer(regsearch.default_registry().get("l1").cls, strength=[0, 1])


def test_the_kit_is_reachable_as_the_readme_writes_it():
    """`import regsearch; regsearch.testing.contract_tests(...)` in a fresh process, as the plugin guide says."""
    import subprocess
    import sys

    code = "import regsearch; print(regsearch.testing.contract_tests.__name__, regsearch.surgery.trace.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["contract_tests", "trace"]
