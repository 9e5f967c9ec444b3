"""End to end: small digits studies tracked on a real `mlflow server`, checked the way a user sees them in MLflow.

One study (six trials, aggressive median pruning) is shared by the structure, pruning and summary tests; the
resume test runs its own study twice through the CLI. Every study gets its own name, so its experiment on the
session's server holds nothing else.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_logged_model import raw_digits_test_split

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 4
HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "gap_loss", "gap_acc")


@dataclass
class Tracked:
    """One finished study and what MLflow holds for it."""

    url: str
    name: str
    study: Any  # optuna.Study
    client: Any  # mlflow.MlflowClient
    experiment_id: str
    parent: Any  # mlflow.entities.Run
    children: list  # the trial runs


def experiment_runs(client: Any, name: str) -> tuple[str, Any, list]:
    """(experiment id, the single study run, the trial runs) of the experiment named `name`."""
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment named {name!r}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("regsearch.role") == "study"]
    assert len(parents) == 1, f"expected one study run, got {[r.info.run_name for r in parents]}"
    children = [r for r in runs if r.data.tags.get("regsearch.role") != "study"]
    return experiment.experiment_id, parents[0], children


def by_trial_number(children: list) -> dict[int, Any]:
    numbers = [r.data.tags.get("trial_number") for r in children]
    assert None not in numbers, "a trial run has no trial_number tag"
    assert len(set(numbers)) == len(numbers), f"duplicate trial runs: {sorted(numbers)}"
    return {int(r.data.tags["trial_number"]): r for r in children}


@pytest.fixture(scope="module")
def pruned_study(mlflow_server, tmp_path_factory) -> Tracked:
    """A digits study from its own study file (so the experiment is named after that file), some trials pruned."""
    import optuna
    from mlflow import MlflowClient

    import regsearch

    tmp = tmp_path_factory.mktemp("tracked")
    name = f"digits_{uuid.uuid4().hex[:8]}"
    study_file = tmp / f"{name}.yaml"
    study_file.write_text((REPO / "studies" / "digits.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp)  # anything written to the current folder stays in tmp
            study = regsearch.optimize(
                str(study_file), n_trials=6, storage=str(tmp / "s.journal"), tracking_uri=mlflow_server,
                device="cpu", overrides=[("training.epochs", str(EPOCHS)), ("search.pruner.name", "median"),
                                         ("search.pruner.n_startup_trials", "0"),
                                         ("search.pruner.n_warmup_steps", "0")])
    finally:
        optuna.logging.set_verbosity(verbosity)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id, parent, children = experiment_runs(client, name)
    return Tracked(mlflow_server, name, study, client, experiment_id, parent, children)


def test_one_experiment_one_study_run_and_a_child_run_per_trial(pruned_study):
    import optuna

    t = pruned_study
    study = t.study
    assert study.study_name == t.name
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6
    assert all(tr.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for tr in trials)

    parent = t.parent
    assert parent.info.run_name == t.name
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["regsearch.study"] == t.name
    assert parent.data.params["epochs"] == str(EPOCHS)
    assert parent.data.params["data"] == "digits"
    assert parent.data.params["study_file"].endswith(f"{t.name}.yaml")
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id

    runs = by_trial_number(t.children)
    assert sorted(runs) == [tr.number for tr in trials], "one MLflow run per Optuna trial, no more, no less"
    for tr in trials:
        run = runs[tr.number]
        where = f"trial {tr.number}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, where
        roles = [role for role, holds in (("baseline", tr.user_attrs.get("baseline")),
                                          ("best", tr.number == study.best_trial.number)) if holds]
        # the best trial's and the baseline's runs stand out in MLflow's list of runs
        assert run.info.run_name == "-".join((f"trial-{tr.number}", *roles)), where
        assert run.data.tags.get("regsearch.role") == ("+".join(roles) or None), where
        assert tr.user_attrs["mlflow_run_id"] == run.info.run_id, where
        assert tr.params, where
        for key, value in tr.params.items():
            assert run.data.params.get(key) == str(value), f"{where}: param {key}"
        assert run.data.params["seed"] == str(tr.user_attrs["seed"]), where
        assert run.data.params["precision"] == tr.user_attrs["precision"] == "float32", where  # a digits MLP's

        epochs = tr.user_attrs["epochs"]
        if tr.state == optuna.trial.TrialState.COMPLETE:
            assert epochs == EPOCHS, where
        history = {}
        for key in HISTORY_KEYS:
            points = t.client.get_metric_history(run.info.run_id, key)
            assert sorted(p.step for p in points) == list(range(1, epochs + 1)), f"{where}: {key} steps"
            history[key] = {p.step: p.value for p in points}
        for step in range(1, epochs + 1):
            h = {k: v[step] for k, v in history.items()}
            assert h["gap_acc"] == pytest.approx(h["train_acc"] - h["val_acc"], abs=1e-12), f"{where} step {step}"
            assert h["gap_loss"] == pytest.approx(h["val_loss"] - h["train_loss"], abs=1e-12), f"{where} step {step}"
            assert 0.0 <= h["val_acc"] <= 1.0 and 0.0 <= h["train_acc"] <= 1.0
        # What Optuna saw each epoch is what MLflow shows.
        assert history["val_acc"] == pytest.approx(tr.intermediate_values, abs=1e-12), where
        if tr.state == optuna.trial.TrialState.COMPLETE:
            assert history["val_acc"][EPOCHS] == pytest.approx(tr.value, abs=1e-12), where


def test_pruned_trials_show_as_killed_runs(pruned_study):
    import optuna

    t = pruned_study
    runs = by_trial_number(t.children)
    trials = t.study.get_trials(deepcopy=False)
    pruned = [tr for tr in trials if tr.state == optuna.trial.TrialState.PRUNED]
    complete = [tr for tr in trials if tr.state == optuna.trial.TrialState.COMPLETE]
    # Seeded sampler, seeded CPU training: the median pruner (no start-up trials, no warm-up) prunes some.
    assert pruned, f"no trial was pruned: {[(tr.number, tr.state.name) for tr in trials]}"
    assert complete, "no trial completed"
    assert any(tr.user_attrs["epochs"] < EPOCHS for tr in pruned), "no trial was stopped before its last epoch"
    for tr in pruned:
        run = runs[tr.number]
        assert run.info.status == "KILLED", f"trial {tr.number}"
        assert run.info.end_time is not None, f"trial {tr.number}"
        assert run.data.tags["regsearch.state"] == "PRUNED", f"trial {tr.number}"
        assert run.data.tags["regsearch.reason"].startswith(f"pruned at epoch {tr.user_attrs['epochs']}")
    for tr in complete:
        run = runs[tr.number]
        assert run.info.status == "FINISHED", f"trial {tr.number}"
        assert run.data.tags["regsearch.state"] == "COMPLETE", f"trial {tr.number}"


def test_trial_runs_start_and_end_when_their_trials_do(pruned_study):
    """The MLflow UI shows each trial's own duration, not when the tracking process got to its run."""
    t = pruned_study
    runs = by_trial_number(t.children)
    for tr in t.study.get_trials(deepcopy=False):
        run = runs[tr.number]
        start, end = tr.datetime_start.timestamp(), tr.datetime_complete.timestamp()
        shown = (run.info.end_time - run.info.start_time) / 1000
        where = f"trial {tr.number}: {end - start:.2f} s, its run {shown:.2f} s"
        assert abs(run.info.start_time / 1000 - start) <= 0.05, where
        assert abs(run.info.end_time / 1000 - end) <= 0.3, where
        assert abs(shown - (end - start)) <= max(0.3, 0.25 * (end - start)), where


def test_study_run_has_best_metrics_and_a_loadable_best_model(pruned_study):
    import mlflow
    from mlflow.entities import LoggedModelStatus

    t = pruned_study
    study = t.study
    parent = t.parent
    best = study.best_trial
    metrics = parent.data.metrics
    assert metrics["best_val_acc"] == pytest.approx(best.value, abs=1e-12)
    test_report = study.user_attrs["best_test"]
    assert test_report["trial"] == best.number
    assert metrics["best_test_acc"] == pytest.approx(test_report["test_acc"], abs=1e-12)
    assert 0.5 < metrics["best_test_acc"] <= 1.0
    assert "best_test_loss" in metrics and "best_gap_acc" in metrics
    assert parent.data.tags["best_trial"] == str(best.number)

    # MLflow 3: `log_model(name=...)` makes a LoggedModel whose source is the study run (not a run artifact).
    models = t.client.search_logged_models(experiment_ids=[t.experiment_id])
    assert [m.name for m in models] == ["best_model"]
    model = models[0]
    assert model.source_run_id == parent.info.run_id
    # it says it was logged from the study's own main file (here pytest's), not from the tracking process's `-c`
    assert model.tags["mlflow.source.name"] == sys.argv[0] != "-c"
    assert study.user_attrs["mlflow_best_model"] == {"uri": model.model_uri, "run_id": parent.info.run_id,
                                                     "experiment_id": t.experiment_id}
    # MLflow 3 opens the experiment on its runs, not on its GenAI overview
    assert t.client.get_experiment(t.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert model.status == LoggedModelStatus.READY
    assert [o.model_id for o in parent.outputs.model_outputs] == [model.model_id]

    # A user can load it and it is the best trial's model: on the raw test split (sklearn's pixels 0..16) its
    # test accuracy is the one reported.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(t.url)
    try:
        loaded = mlflow.pyfunc.load_model(model.model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    x_raw, y_raw = raw_digits_test_split()
    labels = loaded.predict(x_raw)
    assert labels.shape == (len(y_raw),)
    accuracy = float((labels == y_raw).mean())
    assert accuracy == pytest.approx(metrics["best_test_acc"], abs=1e-6)




def test_resume_adds_only_the_missing_trials_under_the_same_study_run(mlflow_server, in_tmp, restore_logging):
    import optuna
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from regsearch.cli import cli

    name = f"resume_{uuid.uuid4().hex[:8]}"
    storage = str(in_tmp / "s.journal")
    args = ["optimize", "--study", "digits", "--study-name", name, "--storage", storage, "--tracking-uri",
            mlflow_server, "--device", "cpu", "--set", f"training.epochs={EPOCHS}", "--set", "search.pruner.name=none"]
    client = MlflowClient(tracking_uri=mlflow_server)
    runner = CliRunner()

    first = runner.invoke(cli, [*args, "--n-trials", "3"])
    assert first.exit_code == 0, first.output
    assert f"study {name}: 3 complete" in first.output
    experiment_id, parent, children = experiment_runs(client, name)
    first_parent = parent.info.run_id
    assert sorted(by_trial_number(children)) == [0, 1, 2]
    # it ends by saying where the best model and the study run are
    [model] = client.search_logged_models(experiment_ids=[experiment_id])
    assert f"\nbest model: {model.model_uri} (mlflow.pyfunc.load_model)\n" in first.output
    assert f"\nstudy run: {mlflow_server}/#/experiments/{experiment_id}/runs/{first_parent}\n" in first.output

    second = runner.invoke(cli, [*args, "--n-trials", "5"])
    assert second.exit_code == 0, second.output
    assert f"study {name}: 5 complete" in second.output

    study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))
    assert [tr.state for tr in study.trials] == [optuna.trial.TrialState.COMPLETE] * 5

    experiment_id, parent, children = experiment_runs(client, name)
    assert parent.info.run_id == first_parent, "the resumed study made a new study run"
    assert parent.info.status == "FINISHED"
    runs = by_trial_number(children)
    assert sorted(runs) == [0, 1, 2, 3, 4], "expected exactly one run per trial, none duplicated"
    for number, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == first_parent, f"trial {number}"
        assert run.info.status == "FINISHED" and run.data.tags["regsearch.state"] == "COMPLETE", f"trial {number}"
        assert run.info.run_id == study.trials[number].user_attrs["mlflow_run_id"], f"trial {number}"
    assert parent.data.metrics["best_val_acc"] == pytest.approx(study.best_value, abs=1e-12)
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)


def test_mlflow_works_in_its_own_process_and_the_study_waits_for_it(mlflow_server, tmp_path):
    """The study's process never imports MLflow (its import, the store and the model logging run beside the
    training), yet when `optimize` returns every run is there, ended, and the best model is logged."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    name = f"apart_{uuid.uuid4().hex[:8]}"
    script = (
        "import sys, regsearch\n"
        f"study = regsearch.optimize('digits', n_trials=2, study_name={name!r}, storage='s.journal', "
        f"tracking_uri={mlflow_server!r}, device='cpu', overrides=[('training.epochs', '2')])\n"
        "print('mlflow imported:', 'mlflow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mlflow imported: False" in done.stdout
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id, parent, children = experiment_runs(client, name)
    assert parent.info.status == "FINISHED"
    assert sorted(by_trial_number(children)) == [0, 1]
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    assert [m.name for m in client.search_logged_models(experiment_ids=[experiment_id])] == ["best_model"]


PLUGIN_WITH_A_LAYER = '''
import torch
from torch import nn

import regsearch


class Jitter(nn.Module):
    """Gaussian noise on the inputs while training: a layer defined in this file only."""

    def __init__(self, std):
        super().__init__()
        self.std = std

    def forward(self, x):
        return x + self.std * torch.randn_like(x) if self.training else x


@regsearch.register("input_jitter")
class InputJitter(regsearch.Regularizer):
    """Noise on the model's inputs."""

    def search_space(self, trial):
        return {"std": trial.suggest_float("std", 0.01, 0.1, log=True)}

    def transform_model(self, model, params):
        return nn.Sequential(Jitter(params["std"]), model)
'''


def test_best_model_with_a_layer_from_a_plugin_file_is_logged_and_loads(mlflow_server, tmp_path, monkeypatch):
    """The tracking process cannot import a `--plugin` file's classes by name: they travel with the model."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    import regsearch

    plugin = tmp_path / "jitter_plugin.py"
    plugin.write_text(PLUGIN_WITH_A_LAYER, encoding="utf-8")
    name = f"digits_jitter_{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(tmp_path)
    study = regsearch.optimize(
        "digits", n_trials=2, storage=str(tmp_path / "s.journal"), tracking_uri=mlflow_server, study_name=name,
        device="cpu", plugins=[str(plugin)],
        overrides=[("training.epochs", "2"), ("search.baseline", "false"), ("search.first_trial", "{}"),
                   ("regularizers", "{input_jitter: {enabled: true}}")])
    best = study.best_trial
    assert "input_jitter.std" in best.params
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id, parent, _ = experiment_runs(client, name)
    models = client.search_logged_models(experiment_ids=[experiment_id])
    assert [m.name for m in models] == ["best_model"] and models[0].status == LoggedModelStatus.READY
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        loaded = mlflow.pyfunc.load_model(models[0].model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    x_raw, y_raw = raw_digits_test_split()
    accuracy = float((loaded.predict(x_raw) == y_raw).mean())
    assert accuracy == pytest.approx(parent.data.metrics["best_test_acc"], abs=1e-6)


def test_a_local_tracking_store_is_named_with_how_to_browse_it(tmp_path, capsys):
    """Without a server there is no page to link to: the study run's id, and the `mlflow ui` that shows it."""
    import optuna

    from regsearch.cli._display import print_mlflow_links

    study = optuna.create_study()
    study.set_user_attr("mlflow_parent_run_id", "abc123")
    study.set_user_attr("mlflow_best_model", {"uri": "models:/m-1", "run_id": "abc123", "experiment_id": "7"})
    print_mlflow_links(study, f"sqlite:///{tmp_path}/mlflow.db")
    assert capsys.readouterr().out == ("best model: models:/m-1 (mlflow.pyfunc.load_model)\n"
                                       f"study run: abc123 (to browse it: mlflow ui --backend-store-uri "
                                       f"sqlite:///{tmp_path}/mlflow.db)\n")


def test_both_ways_of_tracking_take_every_call_of_the_port_with_its_parameters():
    """`optimize` may get either implementation from `open_tracking`: a call one of them lacks, or a parameter
    it names differently, would fail only on that path."""
    import inspect

    from regsearch.tracking import LocalTracking, TrackerProcess, Tracking

    calls = {name: inspect.signature(member) for name, member in vars(Tracking).items()
             if callable(member) and not name.startswith("_")}
    assert {"parent_run", "start_trial", "log_epoch", "end_trial", "log_summary", "log_model", "log_report",
            "close"} <= set(calls)
    for impl in (LocalTracking, TrackerProcess):
        for name, wanted in calls.items():
            got = inspect.signature(getattr(impl, name)).parameters
            for param in wanted.parameters.values():
                assert param.name in got and got[param.name].kind == param.kind, f"{impl.__name__}.{name}: {param}"
