"""Studies through the Python API: user models and tensors, totals across resumes, failures, pruning."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import optuna
import pytest
import torch
from torch import nn

import regsearch
from regsearch import PluginError, StudyError, TensorData, spec_from_dict
from regsearch._spec import TrainingSpec
from regsearch._trainer import evaluate, fit
from regsearch.data._tensors import Batcher

COMPLETE, PRUNED, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                          optuna.trial.TrialState.FAIL)


class Tabular(nn.Module):
    """A hand-written model with named layers, as a user would write it."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(10, 32)
        self.act = nn.ReLU()
        self.hidden = nn.Linear(32, 32)
        self.act2 = nn.Tanh()
        self.classifier = nn.Linear(32, 3)

    def forward(self, x):
        return self.classifier(self.act2(self.hidden(self.act(self.encoder(x)))))


def blobs(n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = rng.normal(0, 2.0, (3, 10))
    x = (centres[y] + rng.normal(0, 1.5, (n, 10))).astype(np.float32)
    return x, y


def small_spec(**training):
    return spec_from_dict({
        "training": {"epochs": 4, "batch_size": 64, "lr": [0.01, 0.1], **training},
        "search": {"n_trials": 3, "pruner": {"name": "none"}},
        "regularizers": {"batchnorm": {}, "dropout": {"per_site": True}, "l1": {}, "l2": {}},
    }, name="api")


@pytest.fixture
def data():
    x, y = blobs()
    xt, yt = blobs(200, seed=1)
    return TensorData.from_arrays(x, y, xt, yt, val_fraction=0.25, seed=0)


def test_a_users_module_and_tensors_run_a_study_and_return_the_optuna_study(in_tmp, data):
    study = regsearch.optimize(small_spec(), data=data, model=Tabular, n_trials=4, tracking=False,
                               storage=str(in_tmp / "api.journal"))
    assert isinstance(study, optuna.Study)
    trials = study.get_trials(states=(COMPLETE,))
    assert len(trials) == 4
    names = set().union(*(t.params for t in trials))
    # sites are named after the user's own attributes
    assert names & {"dropout.act.on", "dropout.act2.on"}
    assert all(name.split(".")[0] in {"batchnorm", "dropout", "l1", "l2", "lr"} for name in names)
    assert study.best_value > 0.6
    for t in trials:
        m = t.user_attrs["metrics"]
        assert m["gap_acc"] == pytest.approx(m["train_acc"] - m["val_acc"])
        assert m["gap_loss"] == pytest.approx(m["val_loss"] - m["train_loss"])
    # the tested trial is the leaderboard's first: the best val_acc, a tie going to the lower val_loss
    best = regsearch.leaderboard(study, top=1)[0]
    assert study.user_attrs["best_test"]["trial"] == best["number"]
    assert best["val_acc"] == study.best_value
    tied = [t for t in trials if t.value == study.best_value]
    assert best["number"] == min(tied, key=lambda t: t.user_attrs["metrics"]["val_loss"]).number


def test_the_python_api_is_as_quiet_as_the_command_line_unless_asked(in_tmp, data):
    """No Optuna INFO line per trial in a notebook; `verbose=True` keeps them; the caller's verbosity is back."""
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("optuna").addHandler(handler)
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        run = dict(data=data, model=Tabular, n_trials=1, tracking=False, storage=str(in_tmp / "quiet.journal"))
        regsearch.optimize(small_spec(), **run)
        assert not [m for m in seen if "finished with value" in m], seen
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
        regsearch.optimize(small_spec(), **{**run, "n_trials": 2}, verbose=True)
        assert [m for m in seen if "Trial 1 finished with value" in m], seen
    finally:
        logging.getLogger("optuna").removeHandler(handler)
        optuna.logging.set_verbosity(before)


def test_the_callers_torch_thread_count_is_back_after_a_study(in_tmp, data):
    """Small steps train on fewer threads; a notebook's own torch work afterwards must not stay on them."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        regsearch.optimize(small_spec(), data=data, model=Tabular, n_trials=1, tracking=False,
                           storage=str(in_tmp / "threads.journal"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_n_trials_is_the_studys_total_across_resumes(in_tmp, data):
    storage = str(in_tmp / "total.journal")
    run = dict(data=data, model=Tabular, tracking=False, storage=storage)
    regsearch.optimize(small_spec(), n_trials=2, **run)
    study = regsearch.optimize(small_spec(), n_trials=5, **run)
    assert len(study.get_trials(states=(COMPLETE, PRUNED))) == 5
    study = regsearch.optimize(small_spec(), n_trials=5, **run)
    assert len(study.trials) == 5  # nothing more to do
    assert sorted(t.number for t in study.trials) == list(range(5))


def test_gap_metrics_are_measured_in_eval_mode_on_a_fixed_training_subset(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Dropout(0.9), nn.Linear(64, 3))
    training = TrainingSpec(epochs=3, batch_size=64)
    seen = []
    metrics = fit(model, data, [], training, lr=0.05, device=torch.device("cpu"), seed=7,
                  on_epoch=lambda epoch, m: seen.append(epoch))
    assert seen == [1, 2, 3]
    batcher = Batcher(data)
    val_loss, val_acc = evaluate(model, batcher, data.x_val, data.y_val, 1024)
    subset = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(7))[:len(data.y_val)]
    train_loss, train_acc = evaluate(model, batcher, data.x_train[subset], data.y_train[subset], 1024)
    assert metrics["val_acc"] == pytest.approx(val_acc) and metrics["val_loss"] == pytest.approx(val_loss)
    assert metrics["train_acc"] == pytest.approx(train_acc) and metrics["train_loss"] == pytest.approx(train_loss)
    # the loss seen during training (dropout 0.9 active) is far worse than the eval-mode one
    assert metrics["fit_loss"] > metrics["train_loss"]


def test_a_diverging_trial_fails_with_the_reason_and_the_study_goes_on(in_tmp, data):
    # the baseline trial runs at lr 1e38 (the first trial's): the logits overflow float32
    spec = spec_from_dict({"training": {"epochs": 3, "lr": [0.05, 1.0e38], "schedule": "constant"},
                           "search": {"n_trials": 2, "pruner": {"name": "none"}, "max_consecutive_failures": 100,
                                      "sampler": {"name": "random"}, "first_trial": {"lr": 1.0e38}},
                           "regularizers": {}}, name="diverge")
    study = regsearch.optimize(spec, data=data, model=Tabular, tracking=False, storage=str(in_tmp / "d.journal"))
    failed = study.get_trials(states=(FAIL,))
    assert len(study.get_trials(states=(COMPLETE,))) == 2
    assert failed, "lr 1e38 overflows float32 logits"
    for t in failed:
        assert t.user_attrs["fail_reason"].startswith("loss is NaN/inf at epoch ")
        assert t.params["lr"] > 1.0


PLUGIN = """
    import regsearch

    @regsearch.register("{name}")
    class Flaky(regsearch.Regularizer):
        '''Raises in the training loop of {which} trials.'''

        def search_space(self, trial):
            return {{}}

        def on_epoch_end(self, state, params):
            if {condition}:
                raise RuntimeError("flaky plugin gave up")
"""


def _plugin(tmp, name, which, condition):
    path = tmp / f"{name}.py"
    path.write_text(textwrap.dedent(PLUGIN.format(name=name, which=which, condition=condition)))
    return str(path)


def test_a_plugin_raising_in_a_trial_fails_that_trial_only(in_tmp, data):
    path = _plugin(in_tmp, "flaky_odd", "odd", "self.context.trial_number % 2 == 1")
    spec = spec_from_dict({"training": {"epochs": 2}, "search": {"n_trials": 3, "pruner": {"name": "none"},
                                                                 "baseline": False},
                           "regularizers": {"flaky_odd": {"enabled": True}}, "plugins": [path]}, name="flaky")
    study = regsearch.optimize(spec, data=data, model=Tabular, tracking=False, storage=str(in_tmp / "f.journal"))
    assert [t.number for t in study.get_trials(states=(COMPLETE,))] == [0, 2, 4]
    for t in study.get_trials(states=(FAIL,)):
        assert t.user_attrs["fail_reason"] == "RuntimeError: flaky plugin gave up"


def test_a_plugin_failing_every_trial_stops_the_study_with_a_summary(in_tmp, data):
    path = _plugin(in_tmp, "always_broken", "all", "True")
    spec = spec_from_dict({"training": {"epochs": 1}, "search": {"n_trials": 20, "max_consecutive_failures": 3, "baseline": False},
                           "regularizers": {"always_broken": {"enabled": True}}, "plugins": [path]}, name="broken")
    storage = str(in_tmp / "b.journal")
    with pytest.raises(StudyError, match=r"3 trials failed in a row; the last: RuntimeError: flaky plugin gave up"):
        regsearch.optimize(spec, data=data, model=Tabular, tracking=False, storage=storage)
    study = optuna.load_study(study_name="broken", storage=regsearch._storage.open_storage(storage))
    assert [t.state for t in study.trials] == [FAIL] * 3


def test_a_penalty_that_is_not_a_scalar_is_refused_before_any_trial(in_tmp, data):
    path = in_tmp / "vector_penalty.py"
    path.write_text(textwrap.dedent("""
        import regsearch

        @regsearch.register("vector_penalty")
        class VectorPenalty(regsearch.Regularizer):
            '''Returns a vector penalty (a contract violation).'''

            def search_space(self, trial):
                return {}

            def penalty(self, model, params):
                return next(model.parameters()).sum(dim=1)
    """))
    spec = spec_from_dict({"regularizers": {"vector_penalty": {"enabled": True}}, "plugins": [str(path)]},
                          name="vector")
    storage = in_tmp / "v.journal"
    with pytest.raises(PluginError, match=r"'vector_penalty' \(file .*\): penalty must return a scalar"):
        regsearch.optimize(spec, data=data, model=Tabular, tracking=False, storage=str(storage))
    assert not storage.exists() or "vector" not in optuna.get_all_study_names(regsearch._storage.open_storage(str(storage)))


def test_pruned_trials_are_recorded_with_their_last_metrics(in_tmp, data):
    spec = spec_from_dict({"training": {"epochs": 6, "lr": [1e-4, 0.3]},
                           "search": {"n_trials": 10, "sampler": {"name": "random"},
                                      "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}},
                           "regularizers": {}}, name="prune")
    study = regsearch.optimize(spec, data=data, model=Tabular, tracking=False, storage=str(in_tmp / "p.journal"))
    pruned = study.get_trials(states=(PRUNED,))
    assert pruned, "a median pruner with no warm-up over lr in [1e-4, 0.3] prunes some trials"
    for t in pruned:
        assert t.user_attrs["epochs"] < 6
        assert set(t.user_attrs["metrics"]) >= {"val_acc", "gap_acc", "train_acc"}
    assert len(study.get_trials(states=(COMPLETE, PRUNED))) == 10


def test_trial_seeds_make_a_trial_reproducible(in_tmp, data):
    from regsearch._experiment import prepare
    from regsearch._trial import retrain

    storage = str(in_tmp / "r.journal")
    study = regsearch.optimize(small_spec(), data=data, model=Tabular, n_trials=1, tracking=False, storage=storage)
    exp = prepare(small_spec(), data=data, model=Tabular)
    model = retrain(exp, study.trials[0])
    _, val_acc = evaluate(model, Batcher(exp.data), exp.data.x_val, exp.data.y_val, 1024)
    assert val_acc == pytest.approx(study.trials[0].value)


def test_a_stored_trial_is_retrained_and_tested_in_the_precision_it_trained_in(in_tmp, data):
    """Another machine (without bf16 arithmetic) or another study file retrains and tests a trial as it trained."""
    from regsearch._experiment import prepare
    from regsearch._trial import retrain, stored_autocast, test_score

    study = regsearch.optimize(small_spec(precision="bfloat16"), data=data, model=Tabular, n_trials=1,
                               tracking=False, storage=str(in_tmp / "p.journal"))
    trial = study.trials[0]
    assert trial.user_attrs["precision"] == "bfloat16"
    exp = prepare(small_spec(precision="float32"), data=data, model=Tabular)
    model = retrain(exp, trial)
    val_loss, _ = evaluate(model, Batcher(exp.data), exp.data.x_val, exp.data.y_val, 1024, torch.bfloat16)
    assert val_loss == pytest.approx(trial.user_attrs["metrics"]["val_loss"], rel=1e-5)  # the same model again
    test_acc = test_score(exp, model, stored_autocast(exp, trial))[1]
    assert test_acc == pytest.approx(study.user_attrs["best_test"]["test_acc"])
    # a trial stored before precisions were recorded trained in float32 on a CPU, whatever the study says now
    older = optuna.trial.create_trial(value=trial.value, params=trial.params, distributions=trial.distributions)
    assert stored_autocast(prepare(small_spec(precision="bfloat16"), data=data, model=Tabular), older) is None


def test_a_study_starts_from_its_first_trial_recipe(in_tmp, data):
    spec = spec_from_dict({"training": {"epochs": 2}, "search": {"n_trials": 2, "pruner": {"name": "none"},
                           "first_trial": {"lr": 0.05, "l2.enabled": True, "l2.weight_decay": 1e-4}},
                           "regularizers": {"l2": {}}}, name="first")
    storage = str(in_tmp / "first.journal")
    study = regsearch.optimize(spec, data=data, model=Tabular, tracking=False, storage=storage)
    # trial 0: the unregularized baseline at the recipe's learning rate; trial 1: the recipe
    assert study.trials[0].user_attrs["baseline"] is True and study.trials[0].params == {"lr": 0.05}
    assert study.trials[1].params == {"lr": 0.05, "l2.enabled": True, "l2.weight_decay": 1e-4}
    assert not study.trials[1].user_attrs.get("baseline")
    # enqueued once, when the study is new: a resume runs neither again
    study = regsearch.optimize(spec, data=data, model=Tabular, tracking=False, storage=storage, n_trials=5)
    params = [t.params for t in study.trials]
    assert params.count(study.trials[1].params) == 1 and params.count({"lr": 0.05}) == 1
    assert [t.number for t in study.trials if t.user_attrs.get("baseline")] == [0]


def test_an_interrupted_baseline_is_queued_again_when_the_study_resumes(in_tmp, data):
    builds = []

    def interrupted_third_build() -> nn.Module:  # prepare's probe, the preflight, then trial 0: the baseline
        builds.append(1)
        if len(builds) == 3:
            raise KeyboardInterrupt
        return Tabular()

    spec = spec_from_dict({"training": {"epochs": 2}, "search": {"n_trials": 2, "pruner": {"name": "none"}},
                           "regularizers": {"l2": {}}}, name="again")
    storage = str(in_tmp / "again.journal")
    with pytest.raises(KeyboardInterrupt):
        regsearch.optimize(spec, data=data, model=interrupted_third_build, tracking=False, storage=storage)
    study = regsearch.optimize(spec, data=data, model=Tabular, tracking=False, storage=storage)
    baselines = [t for t in study.trials if t.user_attrs.get("baseline")]
    assert [t.state for t in baselines] == [FAIL, COMPLETE]
    assert baselines[0].user_attrs["fail_reason"] == "interrupted"
    assert "the unregularized baseline (trial " in study.user_attrs["summary"]
    # a third run with nothing left to do queues no further baseline
    study = regsearch.optimize(spec, data=data, model=Tabular, tracking=False, storage=storage)
    assert len([t for t in study.trials if t.user_attrs.get("baseline")]) == 2


def test_a_study_without_test_data_still_says_what_it_found(in_tmp):
    x, y = blobs()
    spec = spec_from_dict({"training": {"epochs": 2}, "search": {"n_trials": 2, "pruner": {"name": "none"}},
                           "regularizers": {"l2": {"enabled": True}}}, name="notest")
    study = regsearch.optimize(spec, data=TensorData.from_arrays(x, y, val_fraction=0.25), model=Tabular,
                               tracking=False, storage=str(in_tmp / "n.journal"))
    summary = study.user_attrs["summary"]
    assert summary.startswith(f"Best combination (trial {study.best_trial.number}): l2(weight_decay=")
    assert "validation accuracy" in summary and "test accuracy" not in summary
    assert "the unregularized baseline (trial 0): validation accuracy " in summary


def test_a_refused_start_does_not_fix_the_study_settings(in_tmp, data):
    spec = spec_from_dict({"training": {"epochs": 1}, "search": {"n_trials": 1, "pruner": {"name": "none"}}},
                          name="refused")
    storage = str(in_tmp / "r.journal")
    with pytest.raises(regsearch.RegsearchError, match="cannot use the MLflow tracking store"):
        regsearch.optimize(spec, data=data, model=Tabular, storage=storage, tracking_uri="sqlite:////dev/full",
                           max_gap=0.5)
    study = regsearch.optimize(spec, data=data, model=Tabular, tracking=False, storage=storage, max_gap=0.2)
    assert study.user_attrs["regsearch.max_gap"] == 0.2 and len(study.get_trials(states=(COMPLETE,))) == 1


def test_the_combination_says_when_every_dropout_site_is_off():
    """A trial can switch dropout on and every one of its sites off: the summary must not read as dropout applied."""
    from regsearch._records import combination

    spec = spec_from_dict({"regularizers": {"dropout": {"per_site": True}, "l2": {}}}, name="sites")
    cat, log = optuna.distributions.CategoricalDistribution([False, True]), \
        optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)
    params = {"dropout.enabled": True, "dropout.2.on": False, "dropout.4.on": False, "l2.enabled": True,
              "l2.weight_decay": 1e-4}
    trial = optuna.trial.create_trial(value=0.9, params=params, distributions={
        k: log if k == "l2.weight_decay" else cat for k in params})
    assert combination(spec, trial) == ["dropout(2.on=off, 4.on=off)", "l2(weight_decay=0.0001)"]
    on = {**params, "dropout.2.on": True, "dropout.2.p": 0.25}
    trial = optuna.trial.create_trial(value=0.9, params=on, distributions={
        k: log if k == "l2.weight_decay" else optuna.distributions.FloatDistribution(0.0, 0.5) if k == "dropout.2.p"
        else cat for k in on})
    assert combination(spec, trial) == ["dropout(2.p=0.25)", "l2(weight_decay=0.0001)"]


RECORDING_PLUGIN = '''
import json, os
import regsearch

@regsearch.register("NAME")
class Rows(regsearch.Regularizer):
    """Writes a fingerprint of the rows each trial trains on (their inputs, in order of the split)."""

    def search_space(self, trial):
        return {}

    def on_train_start(self, state, params):
        rows = sorted(round(float(x.sum()), 4) for batch in state.inputs() for x in batch)
        with open(os.environ["ROWS_LOG"], "a") as log:
            log.write(json.dumps(rows) + "\\n")
'''


@pytest.mark.parametrize("reshuffle", [False, True])
def test_with_reshuffle_each_trial_trains_on_its_own_draw_of_the_same_rows(tmp_path, monkeypatch, reshuffle):
    name = f"rows_{str(reshuffle).lower()}"  # one registry per process: a name per case
    (tmp_path / "rows.py").write_text(RECORDING_PLUGIN.replace("NAME", name))
    monkeypatch.setenv("ROWS_LOG", str(tmp_path / "rows.log"))
    spec = spec_from_dict({"data": {"name": "digits", "train_size": 200}, "model": {"name": "mlp", "hidden": [8]},
                           "training": {"epochs": 1}, "regularizers": {name: {"enabled": True}},
                           "search": {"n_trials": 4, "reshuffle": reshuffle}, "plugins": [str(tmp_path / "rows.py")]},
                          name="rows")
    regsearch.optimize(spec, storage=str(tmp_path / "s.journal"), tracking=False)
    trained = [json.loads(line) for line in (tmp_path / "rows.log").read_text().splitlines()]
    assert len(trained) == 3 and all(len(rows) == len(trained[0]) for rows in trained)  # the baseline runs without
    distinct = {tuple(rows) for rows in trained}
    assert len(distinct) == (3 if reshuffle else 1)
