"""What each regularizer is worth: real retrainings on digits of a winner holding one regularizer that helps
(BatchNorm at a learning rate too low to train without it) and one known to hurt (dropout p 0.9 pinned)."""

from __future__ import annotations

import shutil
import textwrap

import optuna
import pytest
from click.testing import CliRunner

import regsearch
from regsearch import _confirm
from regsearch._ablate import ABLATION_ATTR, ablation_sentence, verdict
from regsearch._records import CONFIRM_ATTR, is_baseline
from regsearch.cli import cli

STUDY = textwrap.dedent("""\
    seed: 0
    data: {name: digits, train_size: 300}
    model: {name: mlp, hidden: [64]}
    training: {epochs: 12, batch_size: 32, lr: 0.005}
    search:
      n_trials: 2
      pruner: {name: none}
      first_trial: {batchnorm.enabled: true, dropout.enabled: true, l2.enabled: true, l2.weight_decay: 1.0e-5}
    regularizers:
      batchnorm: {}
      dropout: {p: 0.9}
      l2: {weight_decay: [1.0e-6, 1.0e-4]}
    """)


def has_dropout(trial: optuna.trial.FrozenTrial, build: dict) -> bool:
    if "on" in build:
        return "dropout" in build["on"]
    return not is_baseline(trial) and bool(trial.params.get("dropout.enabled"))


@pytest.fixture(scope="module")
def ablated(tmp_path_factory, mlflow_store):
    """The 2-trial study (baseline, recipe), then `regsearch confirm --ablate` with 2 seeds, every test score rigged
    in dropout's favour: 1.0 where it is on, 0.0 where it is off."""
    folder = tmp_path_factory.mktemp("ablate")
    (folder / "abl.yaml").write_text(STUDY)
    storage = str(folder / "abl.journal")
    shutil.copy(mlflow_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    regsearch.optimize(str(folder / "abl.yaml"), storage=storage, tracking_uri=uri)
    real = _confirm.retrain_with_seed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_confirm, "retrain_with_seed", lambda exp, trial, seed, **build: {
            **real(exp, trial, seed, **build), "test_acc": 1.0 if has_dropout(trial, build) else 0.0})
        result = CliRunner().invoke(cli, ["confirm", "--study", "abl", "--storage", storage, "--tracking-uri", uri,
                                          "--top", "1", "--seeds", "2", "--ablate"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="abl", storage=regsearch._storage.open_storage(storage))
    return {"folder": folder, "storage": storage, "uri": uri, "output": result.output, "study": study}


@pytest.mark.slow  # about half a minute of real training
def test_dropout_at_p_09_hurts_beyond_noise_and_the_rigged_test_split_decides_nothing(ablated, restore_logging):
    study = ablated["study"]
    done, confirmed = study.user_attrs[ABLATION_ATTR], study.user_attrs[CONFIRM_ATTR]
    winner = next(r for r in confirmed["rows"] if r["winner"])
    base = next(r for r in confirmed["rows"] if r["role"] == "baseline")
    assert winner["role"] == "recipe" and done["winner"] == winner["trial"]
    assert done["seeds"] == confirmed["seeds"] and len(done["seeds"]) == 2  # the confirmation's own seeds
    rows = {(r["regularizer"], r["direction"]): r for r in done["rows"]}
    assert set(rows) == {(n, d) for n in ("batchnorm", "dropout", "l2") for d in ("removed", "added")}
    # paired, run by run: removing = the winner's run minus the ablated one's; adding = it minus the baseline's
    for name in ("batchnorm", "dropout", "l2"):
        out, alone = rows[name, "removed"], rows[name, "added"]
        assert out["val_acc_effect"] == [w - x for w, x in zip(winner["val_acc"], out["val_acc"], strict=True)]
        assert alone["val_acc_effect"] == [x - b for x, b in zip(alone["val_acc"], base["val_acc"], strict=True)]
    dropout, batchnorm = rows["dropout", "removed"], rows["batchnorm", "removed"]
    assert dropout["val_acc_effect_mean"] < 0 and dropout["verdict"] == "hurts"
    assert batchnorm["val_acc_effect_mean"] > 0 and batchnorm["verdict"] == "helps"
    # the test scores said dropout is worth +100 points in both directions: read and shown, never the verdict
    assert dropout["test_acc_effect_mean"] == 1.0 == rows["dropout", "added"]["test_acc_effect_mean"]
    assert "dropout -" in done["sentence"] and "(hurts here)" in done["sentence"]
    assert done["sentence"].index("batchnorm +") < done["sentence"].index("dropout -")  # the largest first


@pytest.mark.slow
def test_confirm_show_and_mlflow_carry_the_ablation(ablated, restore_logging):
    from mlflow import MlflowClient

    sentence = ablated["study"].user_attrs[ABLATION_ATTR]["sentence"]
    assert sentence in ablated["output"]
    shown = CliRunner().invoke(cli, ["show", "--study", "abl", "--storage", ablated["storage"]])
    assert shown.exit_code == 0 and sentence in shown.output
    assert "what each regularizer is worth, with it − without it" in shown.output
    assert any(line.startswith("dropout       removed from trial 1") and line.endswith("hurts")
               for line in shown.output.splitlines())
    client = MlflowClient(tracking_uri=ablated["uri"])
    experiment = client.get_experiment_by_name("abl").experiment_id
    parent = client.search_runs([experiment], filter_string="tags.`regsearch.role` = 'study'")[0]
    runs = client.search_runs([experiment], filter_string="tags.`regsearch.role` = 'ablate'")
    tagged = sorted((d, r.data.tags[f"regsearch.{d}"]) for r in runs for d in ("removed", "added")
                    if f"regsearch.{d}" in r.data.tags)
    assert tagged == sorted((d, n) for n in ("batchnorm", "dropout", "l2") for d in ("removed", "added"))
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"val_acc_effect_mean", "val_acc_effect_sd", "gap_acc_effect_mean"} <= set(run.data.metrics)
    assert parent.data.tags["regsearch.ablate"] == sentence


@pytest.mark.slow
def test_the_report_draws_the_ablation(ablated, restore_logging):
    from regsearch.report._figures import build_sections

    from regsearch.report import summary_lines

    views, found = build_sections(ablated["study"])
    section = next(s for s in found if s.key == "ablation")
    sentence = ablated["study"].user_attrs[ABLATION_ATTR]["sentence"]
    assert section.png and sentence in section.note
    assert sentence in summary_lines(ablated["study"], views)


def effect(name: str, direction: str, runs: list[float]) -> dict:
    import statistics

    return {"regularizer": name, "direction": direction, "val_acc_effect_mean": statistics.fmean(runs),
            "val_acc_effect_sd": statistics.stdev(runs)}


def test_the_sentence_names_each_effect_with_its_verdict_and_says_where_the_directions_disagree():
    rows = [effect("dropout", "removed", [-0.010, -0.012]), effect("dropout", "added", [-0.011, -0.009]),
            effect("batchnorm", "removed", [0.07, 0.072]), effect("batchnorm", "added", [0.0, 0.001]),
            effect("l2", "removed", [0.0, 0.004]), effect("l2", "added", [0.002, 0.0])]
    assert [verdict(r, 1000) for r in rows] == ["hurts", "hurts", "helps", "noise", "noise", "noise"]
    sentence = ablation_sentence(rows, 7, 2, 1000)
    assert sentence.startswith("What each regularizer is worth to trial 7 (val_acc with it − without it, paired "
                               "over 2 seeds, mean ± sd): batchnorm +7.1 ± 0.1 points, dropout -1.1 ± 0.1 (hurts "
                               "here), l2 +0.2 ± 0.3 (noise).")
    assert sentence.endswith("for batchnorm: added alone to the baseline, +0.1 ± 0.1 (noise).")
    # one validation example is the floor of noise: 1 point on 100 rows
    assert verdict(effect("l2", "removed", [0.008, 0.0081]), 100) == "noise"
    # one pair left of two (the same seed diverged on both sides) has no spread: noise, whatever its size
    one_left = {**effect("l2", "removed", [0.05, 0.05]), "val_acc_effect_sd": None, "val_acc": [None, 0.7],
                "diverged_with": 1, "diverged_without": 1}
    assert verdict(one_left, 1000) == "noise"


def test_the_confirmation_compares_no_configuration_whose_runs_diverged():
    from regsearch._records import confirm_sentence

    def row(trial, role, runs, winner=False):
        known = [v for v in runs if v is not None]
        return {"trial": trial, "role": role, "config": "x", "winner": winner, "val_acc": runs,
                "val_acc_mean": sum(known) / len(known), "val_acc_sd": None if len(known) < 2 else 0.01,
                "diverged": runs.count(None)}

    rows = [row(1, "recipe", [0.70, 0.71], winner=True), row(5, "searched", [None, 0.90])]
    sentence = confirm_sentence(rows, 2, 1000)
    assert "beats" not in sentence and sentence.endswith(
        "(runs that diverged: trial 5 1 of 2); no searched configuration is compared with the recipe where runs "
        "diverged.")


@pytest.mark.slow  # about half a minute of real training
def test_a_baseline_winner_is_a_warning_at_the_end_of_optimize_and_one_line_from_confirm(tmp_path, monkeypatch,
                                                                                        restore_logging):
    """Dropout at p 0.9 alone, at a learning rate the baseline trains well with: the confirmation picks the
    baseline, which has nothing to remove."""
    monkeypatch.chdir(tmp_path)
    study = STUDY.replace("lr: 0.005", "lr: 0.05").replace(
        "n_trials: 2", "n_trials: 2\n  confirm: {top: 1, seeds: 2, ablate: true}")
    (tmp_path / "abl.yaml").write_text(study.replace("batchnorm.enabled: true", "batchnorm.enabled: false"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(cli, ["optimize", "--study", "abl.yaml", "--storage", "a.journal", "--tracking-uri",
                                      uri])
    assert result.exit_code == 0, result.output
    assert "search.confirm.ablate: the confirmed winner is the unregularized baseline (trial 0)" in result.output
    again = CliRunner().invoke(cli, ["confirm", "--study", "abl", "--storage", "a.journal", "--tracking-uri", uri,
                                     "--top", "1", "--seeds", "2", "--ablate"])
    assert again.exit_code == 2, again.output
    assert again.stderr.strip().splitlines()[-1] == (
        "Error: --ablate: the confirmed winner of study 'abl' is the unregularized baseline (trial 0): it has no "
        "regularizer to remove (the confirmation is stored)")


def test_a_pareto_study_is_refused_before_any_training():
    from regsearch._ablate import refuse_ablation
    from regsearch._errors import ConfigError

    study = optuna.create_study(study_name="front", directions=["maximize", "minimize"])
    with pytest.raises(ConfigError, match=r"^--ablate: study 'front' is a pareto study; its confirmation's winner"):
        refuse_ablation(study, True)


@pytest.mark.slow  # about twenty seconds of real training
def test_with_folds_each_ablated_configuration_trains_on_the_confirmations_folds(ablated, tmp_path, restore_logging):
    shutil.copy(ablated["storage"], tmp_path / "abl.journal")
    shutil.copy(ablated["folder"] / "mlflow.db", tmp_path / "mlflow.db")
    result = CliRunner().invoke(cli, ["confirm", "--study", "abl", "--storage", str(tmp_path / "abl.journal"),
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--top", "1",
                                      "--folds", "2", "--ablate"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="abl", storage=regsearch._storage.open_storage(str(tmp_path / "abl.journal")))
    done, confirmed = study.user_attrs[ABLATION_ATTR], study.user_attrs[CONFIRM_ATTR]
    assert done["folds"] == confirmed["folds"] == 2 and done["seeds"] == confirmed["seeds"]
    winner = next(r for r in confirmed["rows"] if r["winner"])
    for r in done["rows"]:
        assert len(r["val_acc"]) == 2  # one run per fold, paired fold by fold with the winner's or the baseline's
        if r["direction"] == "removed":
            assert r["val_acc_effect"] == [w - x for w, x in zip(winner["val_acc"], r["val_acc"], strict=True)]
    assert "paired over 2 folds" in done["sentence"] and done["sentence"] in result.output


FLIP_STUDY = textwrap.dedent("""\
    seed: 0
    data: {name: cifar10, train_size: 1000, val_fraction: 0.2}
    model: {name: cnn, channels: [16, 32, 64], hidden: 64}
    training: {epochs: 30, batch_size: 64, lr: 0.05, precision: float32}
    search:
      n_trials: 2
      pruner: {name: none}
      first_trial: {augment.enabled: true}
    regularizers:
      augment: {translate: 4}
    """)


@pytest.mark.slow  # about a minute of real training
def test_flip_and_translate_help_on_the_cifar_sample_beyond_noise(cifar_sample, tmp_path, restore_logging):
    """1,000 of the real CIFAR images, a small CNN trained long enough to memorise them: flip and translate are
    worth points in both directions, and the verdict says so."""
    (tmp_path / "flip.yaml").write_text(FLIP_STUDY)
    storage = str(tmp_path / "flip.journal")
    regsearch.optimize(str(tmp_path / "flip.yaml"), storage=storage, tracking=False, data_dir=str(cifar_sample))
    regsearch.confirm("flip", storage=storage, top=1, seeds=2, ablate=True, tracking=False,
                      data_dir=str(cifar_sample))
    study = optuna.load_study(study_name="flip", storage=regsearch._storage.open_storage(storage))
    rows = {(r["regularizer"], r["direction"]): r for r in study.user_attrs[ABLATION_ATTR]["rows"]}
    assert set(rows) == {("augment", "removed"), ("augment", "added")}
    for row in rows.values():
        assert row["val_acc_effect_mean"] > 0 and row["verdict"] == "helps", row
    assert "augment +" in study.user_attrs[ABLATION_ATTR]["sentence"]


NEEDS_BATCHNORM = textwrap.dedent("""
    import torch
    from torch import nn

    import regsearch

    @regsearch.register("needs_bn")
    class NeedsBatchNorm(regsearch.Regularizer):
        '''A penalty that is NaN in a model without BatchNorm: a network that trains only with it.'''

        def search_space(self, trial):
            return {}

        def penalty(self, model, params):
            has_bn = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
            weight = next(model.parameters())
            return weight.sum() * (0.0 if has_bn else float("nan"))
    """)


@pytest.mark.slow  # about twenty seconds of real training
def test_a_configuration_that_diverges_is_a_result_not_a_crash(tmp_path, restore_logging):
    """Removing BatchNorm from a winner that cannot train without it diverges in every run: the ablation says
    BatchNorm is needed (and the plugin added alone diverges), the confirmation and its ensemble are kept."""
    plugin = tmp_path / "needs_bn.py"
    plugin.write_text(NEEDS_BATCHNORM)
    study_file = tmp_path / "div.yaml"
    study_file.write_text(STUDY.replace("lr: 0.005", "lr: 0.05").replace("dropout.enabled: true", "needs_bn.enabled: true")
                          .replace("dropout: {p: 0.9}", "needs_bn: {}"))
    storage = str(tmp_path / "div.journal")
    regsearch.optimize(str(study_file), storage=storage, tracking=False, plugins=[str(plugin)])
    rows = regsearch.confirm("div", storage=storage, top=1, seeds=2, ablate=True, tracking=False,
                             plugins=[str(plugin)])
    assert rows[0]["role"] == "recipe" and rows[0]["diverged"] == 0 and rows[0]["val_acc_mean"] > 0.5
    study = optuna.load_study(study_name="div", storage=regsearch._storage.open_storage(storage))
    done = study.user_attrs[ABLATION_ATTR]
    got = {(r["regularizer"], r["direction"]): r for r in done["rows"]}
    removed, alone = got["batchnorm", "removed"], got["needs_bn", "added"]
    assert removed["val_acc"] == [None, None] and removed["diverged"] == 2 and removed["verdict"] == "helps"
    assert alone["diverged"] == 2 and alone["verdict"] == "hurts"
    assert got["batchnorm", "added"]["diverged"] == got["needs_bn", "removed"]["diverged"] == 0
    assert done["sentence"].startswith("What each regularizer is worth to trial 1 (val_acc with it − without it, "
                                       "paired over 2 seeds, mean ± sd): batchnorm (2 of 2 runs diverge without it)")
    assert "needs_bn: added alone to the baseline, (2 of 2 runs diverge with it: hurts here)" in done["sentence"]
    assert study.user_attrs[CONFIRM_ATTR]["ensemble"] is not None  # the winner's two models trained
