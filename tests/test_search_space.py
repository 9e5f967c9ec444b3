"""Searching what users tune: training and model keys, a model factory taking the trial, trials rebuilt from them."""

from __future__ import annotations

import optuna
import pytest
from click.testing import CliRunner
from torch import nn

import regsearch
from regsearch._experiment import prepare
from regsearch._opening import pruner
from regsearch._search_space import baseline_params
from regsearch._study_file import load_study
from regsearch._trainer import evaluate
from regsearch._trial import retrain, training_for
from regsearch.cli import cli
from regsearch.data._tensors import Batcher
from tests.test_study import blobs

SEARCHED = ("--set", "training.batch_size=[32,128]", "--set", "training.epochs=[1,3]",
            "--set", "training.optimizer={choices: [sgd, adamw]}",
            "--set", "model.hidden={choices: [[32], [64, 32]]}",
            "--set", "search.first_trial={training.optimizer: adamw, model.hidden: [64, 32], training.batch_size: 128}")


def _linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_training_and_model_keys_are_searched_shown_and_retrained(in_tmp):
    result = CliRunner().invoke(cli, ["optimize", "--study", "digits", "--n-trials", "5", *SEARCHED,
                                      "--tracking-uri", f"sqlite:///{in_tmp}/mlflow.db"])
    assert result.exit_code == 0, result.output
    storage = optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(in_tmp / "regsearch.journal")))
    study = optuna.load_study(study_name="digits", storage=storage)
    trials = study.trials
    assert len(trials) == 5
    # the summary says the winner's searched values, not only its regularizers: width or epochs may be what won
    best = trials[int(study.user_attrs["summary"].split("(trial ", 1)[1].split(")", 1)[0])]
    assert (f"model.hidden={best.params['model.hidden']}; training.batch_size={best.params['training.batch_size']}"
            in study.user_attrs["summary"])
    for t in trials:
        size, epochs = t.params["training.batch_size"], t.params["training.epochs"]
        assert isinstance(size, int) and 32 <= size <= 128
        assert isinstance(epochs, int) and 1 <= epochs <= 3 and t.user_attrs["epochs"] == epochs  # trained so long
        assert t.params["training.optimizer"] in ("sgd", "adamw")
        assert t.params["model.hidden"] in ("[32]", "[64, 32]")
        assert f"training.batch_size={size} " in result.output  # each trial's batch size on the leaderboard
    # the recipe (a list value included) and the baseline: the recipe's values, else mid-range (epochs)
    recipe = trials[1]
    assert (recipe.params["training.optimizer"], recipe.params["model.hidden"],
            recipe.params["training.batch_size"]) == ("adamw", "[64, 32]", 128)
    assert {k: v for k, v in trials[0].params.items() if k != "lr"} == {
        "training.batch_size": 128, "training.epochs": 2, "training.optimizer": "adamw", "model.hidden": "[64, 32]"}

    # a stored trial is rebuilt with its model and trained with its recipe: the same model again
    exp = prepare(load_study("digits", [tuple(s.split("=", 1)) for s in SEARCHED[1::2]]))
    training = training_for(exp, recipe)
    assert (training.batch_size, training.optimizer, training.epochs) == (128, "adamw", recipe.params["training.epochs"])
    model = retrain(exp, recipe)
    assert _linear_shapes(model)[:2] == [(64, 64), (64, 32)]
    val_loss, _ = evaluate(model, Batcher(exp.data), exp.data.x_val, exp.data.y_val, 1024)
    assert val_loss == pytest.approx(recipe.user_attrs["metrics"]["val_loss"], rel=1e-5)

    # the confirmation names each configuration by its searched values too (the recipe's are the first_trial's)
    rows = regsearch.confirm(exp.spec, top=1, seeds=2, storage=str(in_tmp / "regsearch.journal"), tracking=False)
    recipe_row = next(r for r in rows if r["role"] == "recipe")
    assert recipe_row["config"].endswith(f"with model.hidden=[64, 32]; training.batch_size=128; "
                                         f"training.epochs={recipe.params['training.epochs']}; "
                                         "training.optimizer=adamw")


def test_without_a_recipe_the_baseline_takes_mid_range_values_and_first_choices():
    spec = load_study("digits", [tuple(s.split("=", 1)) for s in SEARCHED[1:-2:2]] + [("search.first_trial", "{}")])
    assert baseline_params(spec) == {"lr": pytest.approx(0.0387, abs=1e-4), "training.batch_size": 80,
                                     "training.epochs": 2, "training.optimizer": "sgd", "model.hidden": "[32]"}


def test_the_hyperband_pruner_runs_to_the_most_epochs_searched():
    spec = regsearch.spec_from_dict({"training": {"epochs": [2, 12]}, "search": {"pruner": {"name": "hyperband"}}},
                                    name="h")
    assert spec.training.epochs == 7  # the baseline's: mid-range
    assert pruner(spec)._max_resource == 12


def test_a_range_spanning_two_decades_is_searched_on_a_log_scale():
    spec = regsearch.spec_from_dict({"training": {"batch_size": [16, 2048], "momentum": [0.5, 0.99],
                                                  "eval_batch_size": {"low": 100, "high": 10000, "log": False}}},
                                    name="l")
    assert spec.searched["training.batch_size"].log and spec.training.batch_size == 181  # geometric middle
    assert not spec.searched["training.momentum"].log
    assert not spec.searched["training.eval_batch_size"].log  # said so


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, 3))

    def forward(self, x):
        return self.body(x)


def test_a_model_factory_taking_the_trial_is_searched_and_rebuilt(in_tmp):
    x, y = blobs()
    xt, yt = blobs(200, seed=1)
    data = regsearch.TensorData.from_arrays(x, y, xt, yt, val_fraction=0.25, seed=0)
    spec = regsearch.spec_from_dict({"training": {"epochs": 2, "lr": [0.01, 0.1]},
                                     "search": {"n_trials": 4, "pruner": {"name": "none"}},
                                     "regularizers": {"l2": {}}}, name="factory")

    def factory(trial):
        return Net(trial.suggest_int("width", 8, 64))

    study = regsearch.optimize(spec, data=data, model=factory, tracking=False, storage=str(in_tmp / "f.journal"))
    widths = [t.params["model.width"] for t in study.trials]
    assert all(isinstance(w, int) and 8 <= w <= 64 for w in widths)
    assert widths[0] == 36  # the baseline: mid-range, comparable whatever the sampler draws
    exp = prepare(spec, data=data, model=factory)
    for t in study.trials[:2]:
        model = retrain(exp, t)
        assert _linear_shapes(model)[0] == (10, t.params["model.width"])
        val_loss, _ = evaluate(model, Batcher(exp.data), exp.data.x_val, exp.data.y_val, 1024)
        assert val_loss == pytest.approx(t.user_attrs["metrics"]["val_loss"], rel=1e-5)


def test_a_model_factory_of_two_arguments_is_refused_before_any_trial(in_tmp):
    x, y = blobs()
    data = regsearch.TensorData.from_arrays(x, y, x, y, val_fraction=0.25, seed=0)
    with pytest.raises(regsearch.ConfigError, match=r"^model: a model factory takes no argument or one"):
        regsearch.optimize(regsearch.spec_from_dict({}, name="two"), data=data, model=lambda trial, width: Net(width),
                           tracking=False, storage=str(in_tmp / "t.journal"))
