"""Confirming a study's winner with fresh seeds: real retrainings on digits, a stored study with a lucky bad trial."""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import replace

import optuna
import pytest
import torch
from click.testing import CliRunner

import regsearch
from regsearch import _confirm
from regsearch._records import beyond_noise, confirm_sentence
from regsearch.cli import cli

STUDY = textwrap.dedent("""\
    seed: 0
    data: {name: digits, train_size: 300}
    model: {name: mlp, hidden: [32]}
    training: {epochs: 12, batch_size: 32, lr: [0.01, 0.1]}
    search:
      n_trials: 3
      pruner: {name: none}
      first_trial: {lr: 0.05, l1.enabled: false, l2.enabled: true, l2.weight_decay: 1.0e-4}
    regularizers:
      l1: {strength: [1.0e-6, 10.0]}
      l2: {}
    """)
BAD = {"lr": 0.05, "l1.enabled": True, "l1.strength": 10.0, "l2.enabled": False}
"""An L1 strength at the top of its range: it drives every weight to zero (chance accuracy, whatever the seed)."""


def lucky_bad_trial(study: optuna.Study) -> int:
    """Store the bad configuration as if one run of it had been the luckiest of all (val_acc 0.999)."""
    known = {k: d for t in study.trials for k, d in t.distributions.items()}
    distributions = {k: known.get(k) or optuna.distributions.FloatDistribution(1e-6, 10.0, log=True) for k in BAD}
    study.add_trial(optuna.trial.create_trial(
        value=0.999, params=BAD, distributions=distributions,
        user_attrs={"metrics": {"val_acc": 0.999, "val_loss": 0.01, "gap_acc": 0.0, "train_acc": 0.999}}))
    return study.trials[-1].number


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory, mlflow_store):
    """A stored 3-trial study plus the lucky bad trial, confirmed by `regsearch confirm` (top 2, 2 seeds) with
    test scores rigged in the bad configuration's favour: 1.0 for it, 0.0 for every other."""
    folder = tmp_path_factory.mktemp("confirm")
    (folder / "conf.yaml").write_text(STUDY)
    storage = str(folder / "conf.journal")
    study = regsearch.optimize(str(folder / "conf.yaml"), storage=storage, tracking=False)
    bad = lucky_bad_trial(study)
    assert regsearch.leaderboard(study, top=1)[0]["number"] == bad  # the one ranking puts it first
    shutil.copy(mlflow_store, folder / "mlflow.db")
    real = _confirm.retrain_with_seed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_confirm, "retrain_with_seed", lambda exp, trial, seed, **kept: {
            **real(exp, trial, seed, **kept), "test_acc": 1.0 if trial.number == bad else 0.0})
        result = CliRunner().invoke(cli, ["confirm", "--study", str(folder / "conf.yaml"), "--storage", storage,
                                          "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--top", "2",
                                          "--seeds", "2"])
    assert result.exit_code == 0, result.output
    return {"folder": folder, "storage": storage, "bad": bad, "output": result.output,
            "confirm": optuna.load_study(study_name="conf", storage=regsearch._storage.open_storage(storage))
            .user_attrs["confirm"]}


def test_a_lucky_bad_configuration_is_never_confirmed_and_test_accuracy_never_chooses(confirmed, restore_logging):
    rows, bad = confirmed["confirm"]["rows"], confirmed["bad"]
    by_trial = {r["trial"]: r for r in rows}
    # the top 2 by single-run ranking (the bad trial first), the recipe (trial 1) and the baseline (trial 0)
    assert bad in by_trial and {0, 1} <= set(by_trial) and len(rows) in (3, 4)
    assert by_trial[1]["role"] == "recipe" and by_trial[0]["role"] == "baseline"
    assert by_trial[bad]["val_acc_mean"] < 0.5 < by_trial[1]["val_acc_mean"]  # retrained, it is as bad as it is
    winner = next(r for r in rows if r["winner"])
    assert winner["trial"] != bad
    assert winner["val_acc_mean"] == max(r["val_acc_mean"] for r in rows)  # chosen on mean validation accuracy
    # the test scores favoured the bad configuration (1.0 against 0.0): read and shown, never used to choose
    assert by_trial[bad]["test_acc_mean"] == 1.0 and winner["test_acc_mean"] == 0.0
    # two fresh seeds, the same for every configuration, none of them a trial's own seed
    seeds = confirmed["confirm"]["seeds"]
    assert len(set(seeds)) == 2 and all(len(r["val_acc"]) == 2 for r in rows)
    assert not set(seeds) & {regsearch._trial.trial_seed(0, n) for n in by_trial}


def test_show_prints_the_confirmation_and_its_sentence(confirmed, restore_logging):
    result = CliRunner().invoke(cli, ["show", "--study", "conf", "--storage", confirmed["storage"]])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "confirmed with 2 fresh seeds (mean ± standard deviation" in out
    winner = next(r for r in confirmed["confirm"]["rows"] if r["winner"])
    assert f"*{winner['trial']:>5}  {winner['role']:<8}  {winner['val_acc_mean']:.3f} ± " in out
    assert "Confirmed over 2 fresh seeds (mean ± sd)" in out and confirmed["confirm"]["sentence"] in out
    assert confirmed["confirm"]["sentence"] in confirmed["output"]  # `regsearch confirm` printed it too
    # the study ran untracked: the confirmation is not logged, and says why in one warning
    assert "has no parent run in this store; the confirmation is not logged" in confirmed["output"]


def row(trial: int, role: str, mean: float, sd: float, winner: bool = False) -> dict:
    return {"trial": trial, "role": role, "config": "l2(weight_decay=0.0001)" if role != "baseline" else
            "no regularizer", "val_acc_mean": mean, "val_acc_sd": sd, "test_acc_mean": mean, "test_acc_sd": sd,
            "winner": winner}


def test_the_sentence_says_whether_a_searched_configuration_beats_the_recipe_beyond_noise():
    beats = [row(7, "searched", 0.95, 0.004, True), row(1, "recipe", 0.929, 0.005), row(0, "baseline", 0.8, 0.01)]
    assert confirm_sentence(beats, 3, 269).endswith(
        "; trial 7 (l2(weight_decay=0.0001)) beats the recipe (trial 1) by 2.1 ± 0.6 points over 3 seeds.")
    within = [row(7, "searched", 0.95, 0.02, True), row(1, "recipe", 0.94, 0.02)]
    assert "no searched configuration beats the recipe (trial 1) beyond noise (the best, trial 7: +1.0 ± 2.8 " \
           "points over 3 seeds)" in confirm_sentence(within, 3, 269)
    # no spread at all: one validation example (0.37 points of 269) is still noise
    assert not beyond_noise(0.003, 0.0, 269) and beyond_noise(0.004, 0.0, 269)
    # without a recipe, the searched ones are measured against the unregularized baseline
    assert "beats the unregularized baseline (trial 0) by 15.0" in confirm_sentence(
        [row(7, "searched", 0.95, 0.004, True), row(0, "baseline", 0.8, 0.01)], 2, 269)


def test_optimize_confirms_at_the_end_when_the_study_file_asks_and_logs_a_run_per_configuration(
        tmp_path, monkeypatch, mlflow_store, restore_logging):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    shutil.copy(mlflow_store, tmp_path / "mlflow.db")
    (tmp_path / "conf.yaml").write_text(STUDY.replace("n_trials: 3", "n_trials: 2\n  confirm: {top: 1, seeds: 2}"))
    result = CliRunner().invoke(cli, ["optimize", "--study", "conf.yaml"])
    assert result.exit_code == 0, result.output
    assert "confirmed with 2 fresh seeds" in result.output and "Confirmed over 2 fresh seeds" in result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("conf").experiment_id
    parent = client.search_runs([experiment], filter_string="tags.`regsearch.role` = 'study'")[0]
    runs = client.search_runs([experiment], filter_string="tags.`regsearch.role` = 'confirm'")
    # trials 0 (baseline) and 1 (recipe): one run each under the study run, per-seed metrics as steps, the means
    assert sorted(r.data.tags["regsearch.source_trial"] for r in runs) == ["0", "1"]
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0, 1]
        assert {"val_acc_mean", "val_acc_sd", "test_acc_mean", "gap_acc_mean"} <= set(run.data.metrics)
    assert parent.data.tags["regsearch.confirm"].startswith("Confirmed over 2 fresh seeds")
    # rerunning the finished study keeps its confirmation (no second round of trainings, no new runs)
    again = CliRunner().invoke(cli, ["optimize", "--study", "conf.yaml"])
    assert again.exit_code == 0 and "confirming" not in again.output
    assert len(client.search_runs([experiment], filter_string="tags.`regsearch.role` = 'confirm'")) == 2


@pytest.mark.parametrize("args, message", [
    (["--top", "0"], "Invalid value for '--top': 0 is not in the range x>=1."),
    (["--seeds", "1"], "Invalid value for '--seeds': must be at least 2 without --folds"),
    (["--folds", "1"], "Invalid value for '--folds': 1 is not in the range x>=2."),
    (["--folds", "3", "--seeds", "0"], "Invalid value for '--seeds': 0 is not in the range x>=1."),
    (["--storage", "nothing.journal"], "nothing.journal"),
])
def test_confirm_refuses_bad_input_in_one_line_with_exit_2(in_tmp, args, message, restore_logging):
    result = CliRunner().invoke(cli, ["confirm", "--study", "digits", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_a_pareto_study_is_confirmed_like_any_other(tmp_path, monkeypatch, restore_logging):
    """Trials of two objectives have no single `value`: the confirmation reads their val_acc, and the study ends."""
    monkeypatch.chdir(tmp_path)
    pareto = STUDY.replace("n_trials: 3", "n_trials: 2\n  objective: pareto\n  confirm: {top: 1, seeds: 2}")
    (tmp_path / "pareto.yaml").write_text(pareto)
    result = CliRunner().invoke(cli, ["optimize", "--study", "pareto.yaml", "--storage", "p.journal",
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output
    assert "Confirmed over 2 fresh seeds" in result.output


def test_k_fold_confirmation_validates_on_every_row_and_never_confirms_the_lucky_bad_one(confirmed, tmp_path,
                                                                                         restore_logging):
    """On small data the finalists are cross-validated: each trains once per fold; the winner is the best mean
    over the folds, and the report draws it."""
    storage = str(tmp_path / "folds.journal")
    shutil.copy(confirmed["storage"], storage)
    validated = []  # the validation rows each training saw
    real = _confirm.retrain_with_seed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_confirm, "retrain_with_seed", lambda exp, trial, seed: (validated.append(
            (trial.number, seed, len(exp.data.y_val), len(exp.data.y_train))), real(exp, trial, seed))[1])
        result = CliRunner().invoke(cli, ["confirm", "--study", str(confirmed["folder"] / "conf.yaml"), "--storage",
                                          storage, "--top", "1", "--folds", "3"])
    assert result.exit_code == 0, result.output
    # digits with train_size 300 and val_fraction 0.2: 240 + 60 rows pooled, three folds of 100 validated in turn
    assert {(n_val, n_train) for *_, n_val, n_train in validated} == {(100, 200)} and len(validated) == 3 * 3
    per_config = {}
    for number, seed, *_ in validated:
        per_config.setdefault(number, []).append(seed)
    assert len(set(map(tuple, per_config.values()))) == 1  # every configuration: the same seeds, fold by fold
    study = optuna.load_study(study_name="conf", storage=regsearch._storage.open_storage(storage))
    done = study.user_attrs["confirm"]
    by_trial = {r["trial"]: r for r in done["rows"]}
    assert done["folds"] == 3 and len(done["seeds"]) == 3 and all(len(r["val_acc"]) == 3 for r in done["rows"])
    assert set(by_trial) == {confirmed["bad"], 0, 1}  # the top 1 (the lucky bad one), the recipe, the baseline
    assert by_trial[confirmed["bad"]]["val_acc_mean"] < 0.5 and not by_trial[confirmed["bad"]]["winner"]
    assert "confirmed with 3-fold cross-validation (mean ± standard deviation" in result.output
    assert done["sentence"].startswith("Confirmed over 3 folds (mean ± sd)") and done["sentence"] in result.output

    from regsearch.report import render

    page = render(study).decode("utf-8")
    section = page.split('<section id="confirmation">', 1)[1].split("</section>", 1)[0]
    assert "Confirmation of the finalists" in section and section.count('<img alt="Confirmation') == 1
    assert done["sentence"] in page.split("</header>", 1)[0]  # said in the report's summary too


def test_the_folds_pool_training_and_validation_rows_and_each_row_validates_once():
    from regsearch.data._tensors import cv_folds, fold_split, load_dataset

    data = load_dataset("digits", val_fraction=0.2, seed=0, train_size=300)
    folds = [fold_split(data, *rows) for rows in cv_folds(data, 4, seed=7)]
    label_of = {tuple(x): int(y) for x, y in zip(torch.cat([data.x_train, data.x_val]).tolist(),
                                                  torch.cat([data.y_train, data.y_val]).tolist())}
    assert len(label_of) == 300  # digits rows are distinct: a row names itself
    validated = sorted(tuple(x) for f in folds for x in f.x_val.tolist())
    assert validated == sorted(label_of)  # every pooled row is validated exactly once
    for f in folds:
        assert len(f.y_train) + len(f.y_val) == 300 and f.x_test is data.x_test
        assert not {tuple(x) for x in f.x_train.tolist()} & {tuple(x) for x in f.x_val.tolist()}
        assert all(label_of[tuple(x)] == y for x, y in zip(f.x_train.tolist() + f.x_val.tolist(),
                                                            f.y_train.tolist() + f.y_val.tolist()))
        shares = torch.bincount(f.y_val, minlength=10) / len(f.y_val)
        overall = torch.bincount(torch.cat([data.y_train, data.y_val]), minlength=10) / 300
        assert (shares - overall).abs().max() < 0.05  # stratified: each fold has the classes in proportion
    with pytest.raises(regsearch.ConfigError, match="folds must be between 2 and 150"):
        cv_folds(data, 151, seed=7)
    # a class with fewer rows than folds leaves the others stratified
    rare = replace(data, y_train=torch.where(data.y_train == 9, 0, data.y_train))
    rare.y_train[0] = 9
    per_fold = torch.stack([torch.bincount(torch.cat([rare.y_train, rare.y_val])[val], minlength=10)
                            for _, val in cv_folds(rare, 4, seed=7)])
    assert (per_fold[:, 1:9].max(dim=0).values - per_fold[:, 1:9].min(dim=0).values).max() <= 1


def test_the_sentence_pairs_the_runs_of_two_configurations():
    """Same seeds and folds for all: a configuration a point above the recipe in every run beats it, however much
    the runs themselves differ (one fold being harder than another is not noise between the two)."""
    best = {**row(7, "searched", 0.90, 0.05, True), "val_acc": [0.95, 0.90, 0.85]}
    recipe = {**row(1, "recipe", 0.89, 0.05), "val_acc": [0.94, 0.89, 0.84]}
    assert "trial 7 (l2(weight_decay=0.0001)) beats the recipe (trial 1) by 1.0 ± 0.0 points over 3 folds" in \
        confirm_sentence([best, recipe], 3, 269, folds=3)
    shuffled = {**recipe, "val_acc": [0.84, 0.94, 0.89]}  # the same values, unpaired: noise again
    assert "no searched configuration beats the recipe" in confirm_sentence([best, shuffled], 3, 269, folds=3)


def test_a_study_that_confirms_by_folds_keeps_it_on_resume_and_refuses_too_many_folds_up_front(
        tmp_path, monkeypatch, restore_logging):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.yaml").write_text(STUDY.replace("n_trials: 3", "n_trials: 2\n  confirm: {top: 1, folds: 2}"))
    study = regsearch.optimize("f.yaml", storage="f.journal", tracking=False)
    done = study.user_attrs["confirm"]
    assert done["folds"] == 2 and all(len(r["val_acc"]) == 2 for r in done["rows"])
    again = regsearch.optimize("f.yaml", storage="f.journal", tracking=False)
    assert again.user_attrs["confirm"] == done  # resumed with nothing new: the same confirmation, not a new one
    three = regsearch.optimize("f.yaml", storage="f.journal", tracking=False, overrides=[("search.confirm.folds", 3)])
    assert three.user_attrs["confirm"]["folds"] == 3  # another fold count is another confirmation
    result = CliRunner().invoke(cli, ["optimize", "--study", "f.yaml", "--storage", "g.journal", "--tracking-uri",
                                      "sqlite:///none.db", "--set", "search.confirm.folds=151"])
    assert result.exit_code == 2, result.output
    assert "folds must be between 2 and 150 (half the 300 training and validation rows); got 151" in result.output
    if (tmp_path / "g.journal").exists():  # refused before the first trial: nothing was run
        assert not optuna.load_study(study_name="conf", storage=regsearch._storage.open_storage("g.journal")).trials
