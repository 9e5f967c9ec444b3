"""A study remembers itself: resumed and confirmed by its name alone, refused when a rerun asks another question."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

import regsearch
from regsearch import ConfigError, _registry
from regsearch._records import CURVE_ATTR, trial_curve
from regsearch._storage import open_storage
from regsearch._study_record import RECORD_ATTR
from regsearch.cli import cli
from tests.test_table import shared_table


EXE = os.path.join(os.path.dirname(sys.executable), "regsearch")


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """A process-wide registry of the built-ins alone: a plugin another test loaded is not this test's."""
    monkeypatch.setattr(_registry, "_default", None)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(storage)).trials


def wine_rows(path, start: int) -> str:
    pd.read_csv(shared_table("winequality-white.csv")).iloc[start:start + 400].to_csv(path, index=False)
    return str(path)


def test_a_study_made_with_set_values_resumes_and_confirms_by_its_name_alone(tmp_path, mlflow_store):
    shutil.copy(mlflow_store, tmp_path / "mlflow.db")
    table = wine_rows(tmp_path / "wine.csv", 0)
    storage = str(tmp_path / "s.journal")
    where = ["--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    made = invoke("optimize", "--study", "tabular", "--study-name", "wine", "--set", f"data.path={table}",
                  "--set", "data.target=quality", "--set", "training.steps=40", "--set", "search.pruner.name=none",
                  "--set", "search.confirm=null", "--n-trials", "3", *where)  # confirmed below, by its name
    assert made.exit_code == 0, made.output
    record = optuna.load_study(study_name="wine", storage=open_storage(storage)).user_attrs[RECORD_ATTR]
    assert record["raw"]["data"]["path"] == table and record["data"]["sizes"] == {"train": 320, "val": 80}

    by_name = invoke("optimize", "--study", "wine", "--n-trials", "4", *where)
    assert by_name.exit_code == 0, by_name.output
    by_file_name = invoke("optimize", "--study", "tabular", "--study-name", "wine", "--n-trials", "5", *where)
    assert by_file_name.exit_code == 0, by_file_name.output
    assert len(trials(storage, "wine")) == 5
    confirmed = invoke("confirm", "--study", "wine", "--top", "1", "--seeds", "2", *where)
    assert confirmed.exit_code == 0, confirmed.output
    assert "Confirmed over 2 fresh seeds" in confirmed.output

    other_split = invoke("optimize", "--study", "wine", "--set", "data.val_fraction=0.3", "--n-trials", "6", *where)
    assert other_split.exit_code == 2
    assert other_split.output.strip().splitlines()[-1] == (
        "Error: study 'wine' was made with data.val_fraction=0.2; this run has 0.3. A study answers one question: "
        "rerun without the change to resume it, or give another --study-name to start a new study")
    other_file = invoke("optimize", "--study", "tabular", "--study-name", "wine", "--set", "data.target=alcohol",
                        "--n-trials", "6", *where)
    assert other_file.exit_code == 2 and "data.target=quality; this run has alcohol" in other_file.output

    wine_rows(tmp_path / "wine.csv", 2000)  # other rows, written to the same path
    for command in (("optimize", "--n-trials", "6"), ("confirm", "--top", "1")):
        refused = invoke(command[0], "--study", "wine", *command[1:], *where)
        assert refused.exit_code == 2, refused.output
        assert "Error: study 'wine' was trained on other data: its splits hold other rows" in refused.output
        assert "Traceback" not in refused.output
    assert len(trials(storage, "wine")) == 5


SHAKE = textwrap.dedent("""
    import os

    import regsearch

    @regsearch.register("shake")
    class Shake(regsearch.Regularizer):
        '''Leaves the model as it is, and writes a line to USED every time a model is built with it.'''

        def search_space(self, trial):
            return {"amount": trial.suggest_float("amount", 0.001, 0.1, log=True)}

        def transform_model(self, model, params):
            with open(os.environ["SHAKE_USED"], "a") as f:
                f.write("used\\n")
            return model
""")


def test_a_plugin_study_is_resumed_and_confirmed_with_its_plugin_or_refused(tmp_path, monkeypatch, mlflow_store):
    plugin, used = tmp_path / "shake.py", tmp_path / "used.log"
    plugin.write_text(SHAKE)
    monkeypatch.setenv("SHAKE_USED", str(used))
    storage = str(tmp_path / "s.journal")
    settings = {"regularizers.shake": "{enabled: true}", "training.epochs": "2", "data.train_size": "300",
                "search.pruner.name": "none", "search.first_trial": "{lr: 0.05}"}
    regsearch.optimize("digits", n_trials=2, storage=storage, tracking=False, plugins=[str(plugin)],
                       overrides=settings)
    built = used.read_text().count("used")

    with pytest.raises(ConfigError, match=r"made with data.val_fraction=0.2; this run has 0.3"):  # --set as text
        regsearch.optimize("digits", n_trials=3, storage=storage, tracking=False, overrides=["data.val_fraction=0.3"])
    with pytest.raises(ConfigError, match=r"overrides: expected a mapping, \(key, value\) pairs or 'key=value'"):
        regsearch.optimize("digits", n_trials=3, storage=storage, tracking=False, overrides=["epochs 3"])
    study = regsearch.optimize("digits", n_trials=3, storage=storage, tracking=False)  # no plugin given
    assert [t.params.get("shake.amount") is not None for t in study.trials] == [False, True, True]
    assert used.read_text().count("used") > built
    rows = regsearch.confirm("digits", storage=storage, tracking=False, top=1, seeds=2)
    assert any("shake(amount=" in row["config"] for row in rows), rows

    moved = tmp_path / "elsewhere.py"
    plugin.rename(moved)
    with pytest.raises(ConfigError, match=r"study 'digits' used the plugin file .*shake.py, which cannot be loaded "
                                          r"as it was \(no such file\): give --plugin"):
        regsearch.confirm("digits", storage=storage, tracking=False, top=1, seeds=2)
    refused = invoke("optimize", "--study", "digits", "--storage", storage, "--n-trials", "4")
    assert refused.exit_code == 2 and "(no such file)" in refused.output
    # given again from where it lies now (a new process: this one has the file's old place registered)
    shutil.copy(mlflow_store, tmp_path / "mlflow.db")
    again = subprocess.run([EXE, "confirm", "--study", "digits", "--storage", storage, "--top", "1", "--seeds", "2",
                            "--plugin", str(moved)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    plugin.write_text(SHAKE.replace("0.1, log", "0.2, log"))  # back in its place, but not as it was
    with pytest.raises(ConfigError, match=r"\(the file has changed since\)"):
        regsearch.confirm("digits", storage=storage, tracking=False, top=1, seeds=2)


def _old_format_copy(storage: str, name: str, old: str) -> optuna.Study:
    """Study `name` as regsearch stored it before studies recorded themselves: no record, one `curve` list."""
    opened = open_storage(storage)
    new = optuna.load_study(study_name=name, storage=opened)
    copy = optuna.create_study(study_name=old, storage=opened, directions=new.directions)
    for key, value in new.user_attrs.items():
        if key != RECORD_ATTR:
            copy.set_user_attr(key, value)
    for trial in new.trials:
        attrs = {k: v for k, v in trial.user_attrs.items() if not k.startswith(f"{CURVE_ATTR}.")}
        attrs[CURVE_ATTR] = trial_curve(trial)
        copy.add_trial(optuna.trial.create_trial(
            state=trial.state, values=trial.values, params=trial.params, distributions=trial.distributions,
            user_attrs=attrs, intermediate_values=trial.intermediate_values))
    return copy


def test_a_study_stored_before_records_still_reads_resumes_and_confirms(tmp_path):
    storage = str(tmp_path / "s.journal")
    settings = {"training.epochs": "3", "data.train_size": "300", "search.pruner.name": "none"}
    regsearch.optimize("digits", n_trials=2, storage=storage, tracking=False, overrides=settings)
    copy = _old_format_copy(storage, "digits", "old")
    assert [len(trial_curve(t)) for t in copy.trials] == [3, 3]

    shown = invoke("show", "--study", "old", "--storage", storage)
    assert shown.exit_code == 0 and "study old: 2 complete" in shown.output
    report = invoke("report", "--study", "old", "--storage", storage, "--out", str(tmp_path / "r.html"))
    assert report.exit_code == 0, report.output
    assert "No curves" not in (tmp_path / "r.html").read_text()
    # no record: the study file and --set values are given again, as before
    resumed = regsearch.optimize("digits", study_name="old", n_trials=3, storage=storage, tracking=False,
                                 overrides=settings)
    assert len(resumed.trials) == 3 and RECORD_ATTR not in resumed.user_attrs
    rows = regsearch.confirm("digits", study_name="old", storage=storage, tracking=False, top=1, seeds=2,
                             overrides=settings)
    assert rows[0]["winner"]

    # a trial that searched a plugin's regularizer: retraining it without the plugin is refused
    plugin_trial = dict(copy.trials[0].params, **{"shake.enabled": True})
    distributions = dict(copy.trials[0].distributions,
                         **{"shake.enabled": optuna.distributions.CategoricalDistribution([True, False])})
    copy.add_trial(optuna.trial.create_trial(value=0.99, params=plugin_trial, distributions=distributions))
    for run in (lambda: regsearch.confirm("digits", study_name="old", storage=storage, tracking=False, top=1,
                                          seeds=2, overrides=settings),
                lambda: regsearch.optimize("digits", study_name="old", n_trials=5, storage=storage,
                                           tracking=False, overrides=settings)):
        with pytest.raises(ConfigError, match=r"trial 3 of study 'old' searched the regularizer 'shake', which "
                                              r"this run does not have"):
            run()


def test_an_images_study_recorded_at_the_old_default_size_is_refused_not_resumed_at_another(tmp_path):
    """Before images kept their own size, a study without data.image_size decoded them at 64: resuming it on
    32-pixel images now would silently train at another size (their means barely move when scaled)."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from regsearch._study_record import data_fingerprint, refuse_other_data
    from regsearch.data.images import load_images

    rng = np.random.default_rng(0)
    for i in range(12):
        folder = tmp_path / "photos" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = load_images(tmp_path / "photos", val_fraction=0.5)
    now = data_fingerprint(data)
    assert now["shape"] == [3, 32, 32]
    old = {k: v for k, v in now.items() if k != "shape"}  # a record written before the shape was kept
    with pytest.raises(ConfigError, match=r"its images were resized to 64 x 64 \(the default when it was made\), "
                                          r"this run's to 32 x 32"):
        refuse_other_data("photos", SimpleNamespace(data=old, spec={"data": {"image_size": None}}), data)
    refuse_other_data("photos", SimpleNamespace(data=old, spec={"data": {"image_size": 32}}), data)  # it was given
    with pytest.raises(ConfigError, match=r"its inputs had shape \(3, 64, 64\); this run's have \(3, 32, 32\)"):
        refuse_other_data("photos", SimpleNamespace(data={**now, "shape": [3, 64, 64]}, spec={}), data)
