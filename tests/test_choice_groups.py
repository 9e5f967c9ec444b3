"""Choice groups: regularizers sharing `choice: GROUP` are mutually exclusive, one categorical picks one or none."""

from __future__ import annotations

import pytest
import torch

import regsearch
from regsearch import ConfigError, TensorData, spec_from_dict


def test_at_most_one_member_of_a_choice_group_is_on_in_each_trial(in_tmp):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen)
    data = TensorData.from_arrays(x, (x[:, 0] > 0).long(), val_fraction=0.25)
    spec = spec_from_dict({"training": {"epochs": 1}, "search": {"n_trials": 8, "sampler": {"name": "random"},
                                                                "baseline": False},
                           "regularizers": {"dropout": {"choice": "noise"}, "l1": {"choice": "noise"}, "l2": {}}},
                          name="choice")
    study = regsearch.optimize(spec, data=data, tracking=False, storage=str(in_tmp / "c.journal"))
    picks = set()
    for trial in study.trials:
        pick = trial.params["choice.noise"]
        picks.add(pick)
        assert "dropout.enabled" not in trial.params and "l1.enabled" not in trial.params
        assert ("dropout.p" in trial.params) == (pick == "dropout")
        assert ("l1.strength" in trial.params) == (pick == "l1")
        assert "l2.enabled" in trial.params  # outside the group: its own switch
    assert len(picks) >= 2
    assert study.trials[0].distributions["choice.noise"].choices == ("none", "dropout", "l1")


@pytest.mark.parametrize("options, message", [
    ({"choice": "Mix Up"}, r"regularizers\.l1\.choice: a group name of lower-case letters"),
    ({"choice": "mix", "enabled": True}, r"regularizers\.l1: enabled: true contradicts choice: mix"),
])
def test_bad_choice_groups_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_dict({"regularizers": {"l1": options}}, name="bad")
