"""The confirmed winner's models averaged: measured on validation, logged as the study's model where they beat one
model beyond noise, loaded in a fresh process; test accuracy read only; no ensemble with folds.

Real trainings on digits: a small network trained for three epochs on 200 rows varies a lot from seed to seed, so
that five of them averaged beat one of them by far more than their spread.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner

import regsearch
from regsearch import _confirm
from regsearch._ensemble import ProbabilityAverage, ensemble_beats, form_ensemble
from regsearch.cli import cli
from regsearch.tracking._store import MODEL_ATTR
from tests.test_logged_model import predict_elsewhere, raw_digits_test_split

STUDY = textwrap.dedent("""\
    seed: 0
    data: {name: digits, train_size: 400, val_fraction: 0.5}
    model: {name: mlp, hidden: [16]}
    training: {epochs: 3, batch_size: 16, lr: [0.1, 0.1]}
    search:
      n_trials: 1
      pruner: {name: none}
      confirm: {top: 1, seeds: 5}
    regularizers:
      l2: {}
    """)
"""One trial (the baseline), confirmed with 5 seeds at the end of `optimize`."""


def stored(storage: str, name: str = "ens") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=regsearch._storage.open_storage(storage))


@pytest.fixture(scope="module")
def optimized(tmp_path_factory, mlflow_store):
    """`regsearch optimize` of the study, tracked in a SQLite store, its model registered; confirmed at its end."""
    folder = tmp_path_factory.mktemp("ensemble")
    (folder / "ens.yaml").write_text(STUDY)
    shutil.copy(mlflow_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        # an environment naming another store: --tracking-uri decides where the models are logged and registered
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'elsewhere.db'}")
        result = CliRunner().invoke(cli, ["optimize", "--study", "ens.yaml", "--storage", "ens.journal",
                                          "--tracking-uri", uri, "--register-model", "ens-digits"])
    assert result.exit_code == 0, result.output
    return {"folder": folder, "storage": str(folder / "ens.journal"), "uri": uri, "output": result.output}


def test_the_ensemble_that_beats_one_model_becomes_the_studys_model(optimized, restore_logging):
    from mlflow import MlflowClient

    study = stored(optimized["storage"])
    done = study.user_attrs["confirm"]
    ensemble, winner = done["ensemble"], next(r for r in done["rows"] if r["winner"])
    assert ensemble["models"] == 5 and ensemble["trial"] == winner["trial"]
    # measured on the study's validation split against the same five models one at a time
    assert ensemble["val_gain"] == pytest.approx(ensemble["val_acc"] - winner["val_acc_mean"])
    assert ensemble["beats"] and ensemble["val_gain"] > 2 * winner["val_acc_sd"]
    assert ensemble["predict_time_ratio"] > 0
    out = optimized["output"]
    assert ensemble["sentence"] in out and "beyond noise: the ensemble is the study's model, at " in out
    model = study.user_attrs[MODEL_ATTR]
    assert model["ensemble"] == 5 and model["single"]["uri"] != model["uri"]
    assert f"best model: {model['uri']} (mlflow.pyfunc.load_model; the ensemble of trial " in out
    shown = CliRunner().invoke(cli, ["show", "--study", "ens", "--storage", optimized["storage"]])
    assert shown.exit_code == 0 and ensemble["sentence"] in shown.output.splitlines()

    client = MlflowClient(tracking_uri=optimized["uri"])
    experiment = client.get_experiment_by_name("ens").experiment_id
    names = {m.name: m.model_uri for m in client.search_logged_models(experiment_ids=[experiment])}
    assert names == {"best_model": model["single"]["uri"], "ensemble_model": model["uri"]}
    parent = client.get_run(model["run_id"]).data
    assert parent.metrics["ensemble_val_acc"] == pytest.approx(ensemble["val_acc"])
    assert parent.tags["regsearch.ensemble"] == ensemble["sentence"]
    # the registered model's newest version is the ensemble, tagged as one
    versions = sorted(client.search_model_versions("name = 'ens-digits'"), key=lambda v: int(v.version))
    assert [v.tags.get("regsearch.ensemble") for v in versions] == [None, "5"]
    assert versions[-1].tags["regsearch.test_acc"] == str(ensemble["test_acc"])


def test_confirm_logs_the_ensemble_and_it_predicts_its_test_accuracy_in_a_fresh_process(optimized, tmp_path,
                                                                                        restore_logging):
    """`regsearch confirm` on a study whose run exists: the ensemble of its 4 models is the study's model, and it
    loads elsewhere (regsearch blocked) and scores on the raw test split what the confirmation stored."""
    shutil.copy(optimized["storage"], tmp_path / "ens.journal")
    shutil.copy(optimized["folder"] / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(cli, ["confirm", "--study", str(optimized["folder"] / "ens.yaml"), "--storage",
                                      str(tmp_path / "ens.journal"), "--tracking-uri", uri, "--top", "1",
                                      "--seeds", "4"])
    assert result.exit_code == 0, result.output
    study = stored(str(tmp_path / "ens.journal"))
    ensemble, model = study.user_attrs["confirm"]["ensemble"], study.user_attrs[MODEL_ATTR]
    assert ensemble["models"] == 4 and ensemble["beats"] and model["ensemble"] == 4
    assert f"the study's model is the ensemble of 4: {model['uri']}" in result.output
    assert ensemble["sentence"] in result.output
    # the single best model stays the one `optimize` logged, to come back to
    assert model["single"] == stored(optimized["storage"]).user_attrs[MODEL_ATTR]["single"]

    x, y = raw_digits_test_split()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    got = predict_elsewhere(tmp_path, uri, model["uri"],
                            f"x, y = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})")
    assert got["n"] == len(y) == 450
    assert got["right"] == round(ensemble["test_acc"] * len(y)), got
    assert got["proba_columns"] == [str(i) for i in range(10)] and got["proba_agrees"]


def test_the_test_split_never_decides(optimized):
    """The same five models, the test labels shuffled: the same validation numbers and decision; only the test
    accuracy, read and reported, changes."""
    from regsearch._experiment import prepare
    from regsearch._study_file import load_study

    spec = load_study(str(optimized["folder"] / "ens.yaml"))
    exp = prepare(spec, device="cpu")
    trial = stored(optimized["storage"]).trials[0]
    seeds = _confirm.confirm_seeds(spec.seed, 5, [trial.number])
    models: list[torch.nn.Module] = []
    row = _confirm.trained_runs(exp, trial, seeds, [None] * 5, keep=models)
    record, _ = form_ensemble(exp, trial, row, models)
    shuffled = replace(exp, data=replace(exp.data, y_test=exp.data.y_test[torch.randperm(
        len(exp.data.y_test), generator=torch.Generator().manual_seed(0))]))
    other, _ = form_ensemble(shuffled, trial, row, models)
    assert record["beats"] and other["beats"]
    assert (other["val_acc"], other["val_loss"], other["val_gain"]) == (record["val_acc"], record["val_loss"],
                                                                         record["val_gain"])
    assert other["test_acc"] < record["test_acc"] - 0.3  # the shuffled labels were read: about chance


def test_folds_form_no_ensemble_and_say_so(optimized, tmp_path, restore_logging):
    """Each fold's model trained on the other folds' validation rows: no ensemble, one line; the single best model is
    the study's model again."""
    storage = str(tmp_path / "ens.journal")
    shutil.copy(optimized["storage"], storage)
    result = CliRunner().invoke(cli, ["confirm", "--study", str(optimized["folder"] / "ens.yaml"), "--storage",
                                      storage, "--top", "1", "--folds", "2", "--tracking-uri",
                                      f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "no ensemble is formed with folds" in line]
    assert len(said) == 1 and "other folds' validation rows" in said[0]
    study = stored(storage)
    assert study.user_attrs["confirm"]["ensemble"] is None and "Ensemble of" not in result.output
    assert study.user_attrs[MODEL_ATTR] == stored(optimized["storage"]).user_attrs[MODEL_ATTR]["single"]


def test_the_rule_is_the_confirmations_noise_rule():
    """Paired against each of its members: the gain over their mean must exceed their sd and one example."""
    members = [0.60, 0.62, 0.64]  # sd 0.02
    assert ensemble_beats(0.66, members, 200) and not ensemble_beats(0.64, members, 200)
    assert not ensemble_beats(0.624, [0.62, 0.62, 0.62], 200)  # no spread: one example (0.5 points) is noise
    assert ensemble_beats(0.626, [0.62, 0.62, 0.62], 200)


def test_the_ensemble_averages_probabilities_not_logits():
    """One member sure of class 0, two fairly sure of class 1: the averaged probabilities say 1 (averaged logits, the
    sure one's 20 against 3, would say 0)."""
    members = [torch.nn.Linear(1, 2) for _ in range(3)]
    with torch.no_grad():
        for member, bias in zip(members, ([20.0, 0.0], [0.0, 3.0], [0.0, 3.0]), strict=True):
            member.weight.zero_()
            member.bias.copy_(torch.tensor(bias))
    out = ProbabilityAverage(members)(torch.zeros(1, 1))
    mean = sum(torch.softmax(m.bias, 0) for m in members) / 3
    assert torch.allclose(torch.softmax(out, 1)[0], mean) and out.argmax().item() == 1
    assert sum(m.bias for m in members).argmax().item() == 0
