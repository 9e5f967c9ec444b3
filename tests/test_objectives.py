"""Gap-aware objectives: a gap constraint (--max-gap) and a two-objective Pareto study (--objective pareto).

Real tiny digits studies through the command line and the Python API, with real Optuna storage and MLflow.
"""

from __future__ import annotations

import json
import shutil
import uuid

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

import regsearch
from regsearch import ConfigError
from regsearch._records import best_trial, pareto_front, trial_curve
from regsearch.cli import cli

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
EPOCHS = 4
SMALL = ("--study", "digits", "--device", "cpu", "--set", f"training.epochs={EPOCHS}", "--set", "model.hidden=[32]")
"""A digits study small enough for a test; the median pruner prunes some of its trials at once."""
EAGER_PRUNER = ("--set", "search.pruner.n_startup_trials=2", "--set", "search.pruner.n_warmup_steps=1")


def journal(path) -> optuna.storages.BaseStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def load(path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=journal(path))


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_error_line(result) -> str:
    """The single `Error:` line of a refused command (exit 2, nothing else said)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def board(output: str) -> dict[int, list[str]]:
    """The leaderboard's rows by trial number (each row split on whitespace)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["trial", "state"]) + 1
    rows = {}
    for line in lines[start:]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        rows[int(cells[0])] = cells
    return rows


def parent_and_children(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("regsearch.role") == "study")
    children = {int(r.data.tags["trial_number"]): r for r in runs if "trial_number" in r.data.tags}
    return parent, children


@pytest.mark.slow
def test_max_gap_picks_the_best_feasible_trial_and_marks_the_others(in_tmp, mlflow_store, restore_logging):
    shutil.copy(mlflow_store, in_tmp / "mlflow.db")
    storage = in_tmp / "gap.journal"
    common = (*SMALL, *EAGER_PRUNER, "--set", "search.baseline=false", "--storage", str(storage), "--tracking-uri",
              f"sqlite:///{in_tmp}/mlflow.db")
    result = invoke("optimize", *common, "--n-trials", "6", "--max-gap", "0.01")
    assert result.exit_code == 0, result.output
    study = load(storage, "digits")
    assert study.user_attrs["regsearch.max_gap"] == 0.01

    finished = study.get_trials(states=(COMPLETE, PRUNED))
    # the gap constraint is on every finished trial, pruned ones too (from their last metrics): TPE uses both
    for t in finished:
        assert t.constraints == {"gap_acc": pytest.approx(t.user_attrs["metrics"]["gap_acc"] - 0.01)}, t.number
    complete = [t for t in finished if t.state == COMPLETE]
    feasible = [t for t in complete if t.user_attrs["metrics"]["gap_acc"] <= 0.01]
    infeasible = [t for t in complete if t not in feasible]
    assert any(t.state == PRUNED for t in finished), "this setup is meant to prune a trial"
    assert feasible and infeasible, [(t.number, t.user_attrs["metrics"]["gap_acc"]) for t in complete]

    best = max(feasible, key=lambda t: t.value)
    # the constraint mattered: an infeasible trial validated better than the chosen one
    assert max(t.value for t in infeasible) > best.value
    assert study.best_trial.number == best.number
    assert study.user_attrs["best_test"]["trial"] == best.number
    assert f"best trial {best.number}: test accuracy" in result.output
    parent, _ = parent_and_children(MlflowClient(f"sqlite:///{in_tmp}/mlflow.db"), "digits")
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.params["max_gap"] == "0.01"

    # the leaderboard (after the run and from `show`) says which trials break the constraint, best feasible first
    shown = invoke("show", "--study", "digits", "--storage", str(storage))
    assert shown.exit_code == 0, shown.output
    for output in (result.output, shown.output):
        assert "gap constraint: gap_acc <= 0.01" in output
        rows = board(output)
        assert next(iter(rows)) == best.number
        for number, cells in rows.items():
            t = study.trials[number]
            assert cells[4] == ("yes" if t.user_attrs["metrics"]["gap_acc"] <= 0.01 else "no"), cells

    # resuming under another constraint or objective is refused, and nothing stored changes
    before = [(t.number, t.state, t.values) for t in study.trials]
    for other, said in ((("--max-gap", "0.02"), "was made with --max-gap 0.01; it cannot go on with --max-gap 0.02"),
                        (("--objective", "pareto"), "max_gap 0.01 and objective pareto do not combine")):
        line = one_error_line(invoke("optimize", *common, "--n-trials", "8", *other))
        assert said in line
    assert [(t.number, t.state, t.values) for t in load(storage, "digits").trials] == before
    # the study remembers its constraint: a rerun that leaves --max-gap out goes on under it
    again = invoke("optimize", "--study", "digits", "--storage", str(storage), "--tracking-uri",
                   f"sqlite:///{in_tmp}/mlflow.db", "--n-trials", "8")
    assert again.exit_code == 0, again.output
    assert "gap constraint: gap_acc <= 0.01" in again.output


def test_no_feasible_trial_is_said_plainly_and_the_study_still_finishes(in_tmp, mlflow_store, restore_logging):
    # 100 training examples and 20 epochs: every trial fits its training data better than validation (gap > 0)
    storage = str(in_tmp / "none.journal")
    overrides = {"training.epochs": 20, "model.hidden": [32], "data.train_size": 100, "search.pruner.name": "none"}
    study = regsearch.optimize("digits", n_trials=3, max_gap=0.0, overrides=overrides, storage=storage,
                               tracking=False, device="cpu")
    complete = study.get_trials(states=(COMPLETE,))
    assert len(complete) == 3
    assert all(t.user_attrs["metrics"]["gap_acc"] > 0 for t in complete)
    assert all(t.constraints["gap_acc"] > 0 for t in complete)
    assert best_trial(study) is None
    assert "best_test" not in study.user_attrs  # nothing infeasible was evaluated on the test split

    shown = invoke("show", "--study", "digits", "--storage", storage)
    assert shown.exit_code == 0, shown.output
    assert "no complete trial has gap_acc <= 0: no best trial, nothing evaluated on the test split" in shown.output
    assert "test accuracy" not in shown.output
    assert all(cells[4] == "no" for cells in board(shown.output).values())

    # a rerun that adds a trial finishes too (exit 0), with the same plain answer
    shutil.copy(mlflow_store, in_tmp / "mlflow.db")
    again = invoke("optimize", "--study", "digits", "--storage", storage, "--n-trials", "4", "--max-gap", "0",
                   "--device", "cpu", "--tracking-uri", f"sqlite:///{in_tmp}/mlflow.db",
                   *[a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")])
    assert again.exit_code == 0, again.output
    assert "no complete trial has gap_acc <= 0" in again.output
    parent, children = parent_and_children(MlflowClient(f"sqlite:///{in_tmp}/mlflow.db"), "digits")
    assert "best_trial" not in parent.data.tags and "best_test_acc" not in parent.data.metrics
    assert sorted(children) == [0, 1, 2, 3]  # the API's untracked trials were logged from the storage


@pytest.mark.slow
def test_pareto_study_keeps_two_values_never_prunes_and_logs_its_front(mlflow_server, in_tmp, restore_logging):
    name = f"pareto_{uuid.uuid4().hex[:8]}"
    storage = in_tmp / "pareto.journal"
    common = (*SMALL, *EAGER_PRUNER, "--study-name", name, "--storage", str(storage), "--tracking-uri", mlflow_server)
    result = invoke("optimize", *common, "--n-trials", "6", "--objective", "pareto")
    assert result.exit_code == 0, result.output
    assert "objective pareto: maximize val_acc, minimize gap_acc; no pruning" in result.stderr

    study = load(storage, name)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.user_attrs["regsearch.objective"] == "pareto"
    # the same pruner settings prune in a val_acc study (see above): here no trial is pruned
    assert [t.state for t in study.trials] == [COMPLETE] * 6
    for t in study.trials:
        m = t.user_attrs["metrics"]
        assert t.values == [m["val_acc"], m["gap_acc"]], t.number
        assert len(trial_curve(t)) == EPOCHS

    front = pareto_front(study)
    numbers = [row["trial"] for row in front]
    assert sorted(numbers) == sorted(t.number for t in study.best_trials) and numbers
    tested = max(study.best_trials, key=lambda t: (t.values[0], -t.values[1])).number
    assert study.user_attrs["best_test"]["trial"] == tested
    # printed: the front, best val_acc first, and which of its trials was tested
    assert f"Pareto front (maximize val_acc, minimize gap_acc): {len(front)} trial" in result.output
    lines = result.output.splitlines()
    start = lines.index(next(line for line in lines if line.split()[:3] == ["trial", "val_acc", "gap_acc"]))
    assert [int(line.split()[0]) for line in lines[start + 1:start + 1 + len(front)]] == numbers
    assert f"best trial {tested} (the front's best val_acc): test accuracy" in result.output

    # logged on the study's parent run: the front as an artifact, its size, the tested trial
    client = MlflowClient(mlflow_server)
    parent, children = parent_and_children(client, name)
    assert parent.data.metrics["pareto_front_size"] == len(front)
    assert parent.data.tags["best_trial"] == str(tested)
    assert parent.data.params["objective"] == "pareto"
    logged = json.loads(open(client.download_artifacts(parent.info.run_id, "pareto_front.json", str(in_tmp))).read())
    assert [row["trial"] for row in logged["trials"]] == numbers
    assert logged["trials"][0]["val_acc"] == pytest.approx(front[0]["val_acc"])
    assert sorted(children) == list(range(6))
    for number, run in children.items():
        assert run.data.tags["regsearch.state"] == "COMPLETE"
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == EPOCHS

    shown = invoke("show", "--study", "digits", "--study-name", name, "--storage", str(storage))
    assert shown.exit_code == 0 and f"{len(front)} trial" in shown.output

    # `sync` into another store rebuilds each trial's per-epoch val_acc from its curve (no intermediate values)
    other = f"sqlite:///{in_tmp}/other.db"
    synced = invoke("sync", "--study", "digits", "--study-name", name, "--storage", str(storage), "--tracking-uri",
                    other)
    assert synced.exit_code == 0, synced.output
    _, copies = parent_and_children(MlflowClient(other), name)
    for number, run in copies.items():
        history = MlflowClient(other).get_metric_history(run.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), number

    # resuming with the other objective is refused; the study keeps its trials
    line = one_error_line(invoke("optimize", *common, "--n-trials", "8", "--objective", "val_acc"))
    assert f"study '{name}' in {storage} was made with objective pareto; it cannot go on with objective val_acc" in line
    assert len(load(storage, name).trials) == 6


def test_api_checks_objective_and_max_gap_before_training(in_tmp):
    for kwargs, said in (({"max_gap": -0.1}, "max_gap: must be >= 0.0; got -0.1"),
                         ({"max_gap": 1.5}, "max_gap: must be <= 1.0; got 1.5"),
                         ({"objective": "gap"}, "objective: unknown value 'gap'"),
                         ({"objective": "pareto", "max_gap": 0.1}, "max_gap 0.1 and objective pareto do not combine")):
        with pytest.raises(ConfigError, match=said.replace("(", r"\(")):
            regsearch.optimize("digits", tracking=False, storage=str(in_tmp / "never.journal"), **kwargs)
    assert not (in_tmp / "never.journal").exists()


def test_show_top_shortens_a_pareto_front_to_its_best_val_acc_and_says_so(in_tmp):
    storage = in_tmp / "front.journal"
    study = optuna.create_study(study_name="front", storage=journal(storage), directions=["maximize", "minimize"])
    study.set_user_attr("regsearch.objective", "pareto")
    dist = {"lr": optuna.distributions.FloatDistribution(0.01, 0.1)}
    # (val_acc, gap_acc): four trials on the front, one behind it
    for val, gap in ((0.90, 0.01), (0.95, 0.03), (0.97, 0.06), (0.99, 0.10), (0.93, 0.05)):
        study.add_trial(optuna.trial.create_trial(values=[val, gap], params={"lr": 0.05}, distributions=dist))

    shown = invoke("show", "--study", "digits", "--study-name", "front", "--storage", str(storage), "--top", "2")
    assert shown.exit_code == 0, shown.output
    assert ("Pareto front (maximize val_acc, minimize gap_acc): 4 trials, the 2 with the highest val_acc shown "
            "(--top 4 shows all)") in shown.output
    lines = shown.output.splitlines()
    start = lines.index(next(line for line in lines if line.split()[:3] == ["trial", "val_acc", "gap_acc"]))
    assert [line.split()[0] for line in lines[start + 1:start + 3]] == ["3", "2"]
    assert not any(line.split()[:1] in (["1"], ["0"]) for line in lines[start + 3:])

    everything = invoke("show", "--study", "digits", "--study-name", "front", "--storage", str(storage))
    lines = everything.output.splitlines()
    start = lines.index(next(line for line in lines if line.split()[:3] == ["trial", "val_acc", "gap_acc"]))
    assert [line.split()[0] for line in lines[start + 1:start + 5]] == ["3", "2", "1", "0"]
    assert "shows all" not in everything.output
