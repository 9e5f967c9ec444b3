"""A reference beside the network on a table: HistGradientBoosting and the majority class, fitted on the same split.

Real rows of the shared wine table (a few hundred), real tiny studies, a real MLflow store.
"""

from __future__ import annotations

import shutil

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.ensemble import HistGradientBoostingClassifier

from regsearch._reference import REFERENCE_ATTR, below_line
from regsearch._storage import open_storage
from regsearch.cli import cli
from regsearch.data.table import load_table
from tests.test_table import shared_table

CRIPPLED = ["--set", "training.steps=2", "--set", "training.lr=1.0e-6"]
"""Two optimizer steps at a learning rate of 1e-6: the network stays where it started, near chance."""


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    """400 training rows and 200 test rows of the shared wine table, drawn seeded."""
    folder = tmp_path_factory.mktemp("wine")
    frame = pd.read_csv(shared_table("winequality-white.csv")).sample(600, random_state=0)
    frame.iloc[:400].to_csv(folder / "train.csv", index=False)
    frame.iloc[400:].to_csv(folder / "test.csv", index=False)
    return folder


def run(folder, name: str, *extra: str):
    args = ["optimize", "--study", "tabular", "--study-name", name, "--n-trials", "2", "--set",
            "data.path=train.csv", "--set", "data.test_path=test.csv", "--set", "data.target=quality", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name=name, storage=open_storage(str(folder / "regsearch.journal")))
    return result, study


@pytest.fixture(scope="module")
def crippled(wine, mlflow_store):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(wine)
        shutil.copy(mlflow_store, wine / "mlflow.db")
        return run(wine, "crippled", *CRIPPLED)


def test_the_reference_is_a_plain_sklearn_fit_on_the_networks_training_split(wine, crippled, restore_logging):
    _, study = crippled
    found = study.user_attrs[REFERENCE_ATTR]
    data = load_table(wine / "train.csv", "quality", test_path=wine / "test.csv", val_fraction=0.2, seed=0)
    x, y = data.x_train.numpy(), data.y_train.numpy()
    direct = HistGradientBoostingClassifier(random_state=0).fit(x, y)
    assert found["reference_val_acc"] == float((direct.predict(data.x_val.numpy()) == data.y_val.numpy()).mean())
    assert found["reference_test_acc"] == float((direct.predict(data.x_test.numpy()) == data.y_test.numpy()).mean())
    majority = np.bincount(y).argmax()
    assert found["majority_test_acc"] == float((data.y_test.numpy() == majority).mean())
    assert found["majority_val_acc"] == float((data.y_val.numpy() == majority).mean())


def test_a_crippled_network_is_said_to_test_below_the_reference_in_the_summary_show_and_mlflow(
        wine, crippled, restore_logging):
    from mlflow import MlflowClient

    result, study = crippled
    found = study.user_attrs[REFERENCE_ATTR]
    assert "Reference on the same training split: HistGradientBoosting validation " in result.output
    warning = next(line for line in result.output.splitlines() if line.startswith("Warning: the winner's test"))
    assert f"HistGradientBoosting ({found['reference_test_acc']:.3f})" in warning
    shown = CliRunner().invoke(cli, ["show", "--study", "crippled", "--storage", str(wine / "regsearch.journal")])
    assert shown.exit_code == 0 and warning in shown.output
    assert f"HistGradientBoosting validation {found['reference_val_acc']:.3f}" in shown.output
    client = MlflowClient(tracking_uri=f"sqlite:///{wine / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("crippled").experiment_id
    parent = client.search_runs([experiment], filter_string="tags.`regsearch.role` = 'study'")[0]
    for key in ("reference_val_acc", "reference_test_acc", "majority_val_acc", "majority_test_acc"):
        assert parent.data.metrics[key] == pytest.approx(found[key])


def test_the_report_shows_the_reference(wine, crippled, restore_logging):
    from regsearch.report import summary_lines, trial_views

    _, study = crippled
    lines = summary_lines(study, trial_views(study))
    assert any(line.startswith("Reference on the same training split") for line in lines)
    assert any(line.startswith("Warning: the winner's test accuracy") for line in lines)


def test_switched_off_no_reference_is_fitted_or_shown(wine, crippled, restore_logging, monkeypatch):
    monkeypatch.chdir(wine)
    result, study = run(wine, "no-reference", *CRIPPLED, "--set", "search.reference=false", "--tracking-uri",
                        f"sqlite:///{wine / 'mlflow.db'}")
    assert REFERENCE_ATTR not in study.user_attrs
    assert "Reference on the same" not in result.output and "HistGradientBoosting" not in result.output


def test_the_warning_names_only_what_the_winner_falls_below():
    found = {"reference_test_acc": 0.80, "majority_test_acc": 0.50}
    assert below_line(found, 0.85, 0.84, "test") is None
    line = below_line(found, 0.75, 0.70, "test")
    assert line == "Warning: the winner's test accuracy 0.750 is below HistGradientBoosting (0.800)."
    line = below_line(found, 0.45, 0.70, "test")
    assert "the unregularized baseline (0.700), the majority class (0.500), HistGradientBoosting (0.800)" in line
