"""The shipped `cifar` study end to end through the CLI, on the shared real CIFAR-10 sample (small settings)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TRAIN_SIZE = 1500
"""Examples drawn from the sample's 5,000 (1,350 train, 150 validation with the study's val_fraction 0.1).
With seed 0, trial 0 reaches val_acc 0.24 (1 or 2 CPU threads alike), trial 1 draws lr 0.19 and is pruned."""
EPOCHS = 3
N_TRIALS = 2
CHANCE = 0.1


def regsearch(*args: str, cwd: Path, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (the same interpreter), offline, with its own empty download cache."""
    env = {**os.environ, "REGSEARCH_OFFLINE": "1", "REGSEARCH_CACHE": str(cache)}
    env.pop("REGSEARCH_TEST_STRICT", None)
    return subprocess.run([sys.executable, "-m", "regsearch.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cifar_run(cifar_sample, tmp_path_factory):
    """One small run of the real `cifar` study, shared by the checks below."""
    root = tmp_path_factory.mktemp("cifar-study")
    (root / "cache").mkdir()
    journal = root / "cifar.journal"
    result = regsearch(
        "optimize", "--study", "cifar", "--data-dir", str(cifar_sample),
        "--set", f"data.train_size={TRAIN_SIZE}", "--set", f"training.epochs={EPOCHS}",
        "--n-trials", str(N_TRIALS), "--device", "cpu",
        "--storage", str(journal), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
        cwd=root, cache=root / "cache")
    return root, journal, result


def test_optimize_exits_cleanly(cifar_run):
    root, journal, result = cifar_run
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert "study cifar:" in result.stdout and "val_acc" in result.stdout
    assert "test accuracy" in result.stdout
    assert journal.is_file()
    # the run used the sample it was given: nothing was downloaded or cached
    assert not any((root / "cache").iterdir())


def test_stored_study_holds_the_finished_trials(cifar_run):
    import optuna

    from regsearch._storage import open_storage

    _, journal, result = cifar_run
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="cifar", storage=open_storage(str(journal)))
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == N_TRIALS
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # pruned trials count too
    assert all(t.state in finished for t in trials), [t.state.name for t in trials]
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:
        metrics = t.user_attrs["metrics"]
        assert 0.0 <= metrics["val_acc"] <= 1.0 and 0.0 <= metrics["train_acc"] <= 1.0
        assert isinstance(t.user_attrs["seed"], int) and "lr" in t.params
        assert t.intermediate_values, "no epoch was reported to the pruner"
    # learning happened: the best trial beats guessing among 10 classes clearly (not every trial has to:
    # the sampler may draw a diverging learning rate)
    assert study.best_value > CHANCE + 0.05, [(t.number, t.state.name, t.value) for t in trials]
    best_test = study.user_attrs["best_test"]
    assert best_test["trial"] == study.best_trial.number and 0.0 <= best_test["test_acc"] <= 1.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, raised inside MLflow's sqlite store
def test_mlflow_holds_a_parent_run_and_a_run_per_trial(cifar_run):
    from mlflow.tracking import MlflowClient

    root, _, result = cifar_run
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    roles = sorted(r.data.tags.get("regsearch.role", "?") for r in runs)
    assert len(runs) == N_TRIALS + 1, roles
    parent = [r for r in runs if r.data.tags.get("regsearch.role") == "study"]
    assert len(parent) == 1
    assert parent[0].data.metrics["best_val_acc"] > CHANCE + 0.05
    assert parent[0].data.params["data"] == "cifar10" and parent[0].data.params["epochs"] == str(EPOCHS)


def test_show_prints_the_leaderboard(cifar_run):
    root, journal, result = cifar_run
    assert result.returncode == 0, result.stderr
    shown = regsearch("show", "--study", "cifar", "--storage", str(journal), cwd=root, cache=root / "cache",
                      timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any(line.startswith("study cifar:") for line in lines), shown.stdout
    header = next(i for i, line in enumerate(lines) if "val_acc" in line)
    assert lines[header].split()[:5] == ["trial", "state", "val_acc", "gap_acc", "train_acc"]
    rows = [line.split() for line in lines[header + 1:header + 1 + N_TRIALS]]
    assert sorted(int(r[0]) for r in rows) == list(range(N_TRIALS))
    assert all(r[1] in ("COMPLETE", "PRUNED") for r in rows)
    assert "test accuracy" in shown.stdout


def test_without_data_dir_offline_is_one_line_error(tmp_path):
    (tmp_path / "cache").mkdir()
    result = regsearch("optimize", "--study", "cifar", "--n-trials", "1", "--storage", str(tmp_path / "j.journal"),
                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path,
                       cache=tmp_path / "cache", timeout=300)
    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error:") and "--data-dir" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not any((tmp_path / "cache").iterdir())
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_data_dir_is_one_line_error(tmp_path):
    result = regsearch("optimize", "--study", "cifar", "--n-trials", "1", "--data-dir", str(tmp_path / "nowhere"),
                       "--storage", str(tmp_path / "j.journal"), cwd=tmp_path, cache=tmp_path / "cache",
                       timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "does not exist" in lines[0], result.stderr


def test_the_trial_time_warning_brackets_the_baseline_trial(cifar_sample, tmp_path, monkeypatch, caplog):
    """The up-front CPU warning's range holds the first real trial's duration (the baseline's, within 0.5x the
    low end and 2x the high end), with the threshold lowered so that a small study is warned about."""
    import regsearch
    from regsearch import _estimate

    monkeypatch.setattr(_estimate, "LONG_TRIAL_S", 1.0)
    caplog.set_level(logging.WARNING, logger="regsearch")
    # 1,800 training images: 14 steps an epoch, enough for the trial's own thread probe
    study = regsearch.optimize("cifar", n_trials=1, tracking=False, data_dir=str(cifar_sample), device="cpu",
                               storage=str(tmp_path / "j.journal"),
                               overrides={"data.train_size": 2000, "training.epochs": 4, "search.pruner.name": "none"})
    warned = [r.getMessage() for r in caplog.records if "one trial will take about" in r.getMessage()]
    assert len(warned) == 1, warned
    said = re.search(r"about ([0-9.]+)-([0-9.]+) (s|min) \(from no regularizer to all of them on", warned[0])
    assert said, warned[0]
    low, high = (float(v) * (60 if said[3] == "min" else 1) for v in said.groups()[:2])
    baseline = study.trials[0]
    assert baseline.user_attrs["baseline"] is True
    took = (baseline.datetime_complete - baseline.datetime_start).total_seconds()
    assert 0.5 * low <= took <= 2 * high, f"the baseline trial took {took:.1f} s; the warning: {warned[0]}"
