"""`optimize`: run (or resume) a study to its total, then test its best trial once and say what it found."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
import torch
from torch import nn

from regsearch._confirm import confirm_at_end
from regsearch._errors import ConfigError, StudyError, did_you_mean
from regsearch._experiment import prepare
from regsearch._objective import Objective
from regsearch._question import Question, ask, python_inputs, search_overrides
from regsearch._records import (
    FAIL,
    FAIL_REASON_ATTR,
    FINISHED,
    METRIC_ATTR,
    SUMMARY_ATTR,
    SURPLUS,
    TEST_ATTR,
    best_trial,
    is_pareto,
    pareto_front,
    summary_sentence,
    trial_val_acc,
)
from regsearch._reference import reference_metrics, reference_summary, stored_reference
from regsearch._registry import RegularizerRegistry
from regsearch._session import Stores, attach, start_tracking
from regsearch._spec import StudySpec, search_value
from regsearch._storage import describe_storage, mask_url
from regsearch._threads import callers_threads, set_thread_budget, worker_share
from regsearch._trial import Experiment, rebuild, retrain, stored_autocast, test_score
from regsearch._workers import Job, Progress, run_trials, run_workers
from regsearch.data._tensors import TensorData
from regsearch.tracking._port import registration
from regsearch.tracking._predictor import Predictor

if TYPE_CHECKING:
    from regsearch.tracking import Tracking

logger = logging.getLogger("regsearch")


@dataclass(frozen=True)
class Options:
    """`optimize`'s settings beyond the budget and the inputs: where it is stored and logged, what changes."""

    storage: str | None = None
    tracking: bool = True
    tracking_uri: str | None = None
    study_name: str | None = None
    data_dir: str | None = None
    device: str = "auto"
    seed: int | None = None
    overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] | Sequence[str] = ()
    plugins: Iterable[str] = ()
    registry: RegularizerRegistry | None = None
    objective: str | None = None
    max_gap: float | None = None
    verbose: bool = False
    """Keep Optuna's own INFO line per trial (off: as quiet as the command line)."""
    register_model: str | None = None
    """A Model Registry name for the logged best model (the study's `search.register_model`)."""

    @classmethod
    def of(cls, keywords: Mapping[str, Any]) -> Options:
        known = [f.name for f in dataclasses.fields(cls)]
        for key in keywords:
            if key not in known:
                raise TypeError(f"optimize() got an unexpected keyword argument {key!r}{did_you_mean(key, known)}")
        return cls(**keywords)


def optimize(study: str | StudySpec, *, n_trials: int | None = None, timeout: float | None = None,
             workers: int = 1, data: TensorData | None = None, model: Callable[..., nn.Module] | None = None,
             progress: Progress | None = None, **options: Any) -> optuna.Study:
    """Run (or resume) a study until it holds `n_trials` finished trials in total or `timeout` seconds pass;
    returns the Optuna study. Given a timeout and no `n_trials`, the timeout alone decides how many trials run.

    `study` is a shipped study's name, a study file's path or a `StudySpec`. `data` (a `TensorData`) and
    `model` (a factory of your own `nn.Module`: of no argument, or of the Optuna trial, whose suggestions are the
    parameters `model.<name>`) replace the study's dataset and model.
    `workers` > 1 runs that many worker processes on this machine (they must be able to pickle `data` and
    `model`); the same call on other machines with a shared `storage` joins the same study. `options` are the
    fields of `Options`: `storage`, `tracking`, `tracking_uri`, `study_name`, `data_dir`, `device`, `seed`,
    `overrides` (`--set` pairs), `plugins` (files), `registry`, `objective` ("val_acc" or "pareto") and `max_gap`
    (best trials need gap_acc <= max_gap), the last two replacing the study's `search.objective`/`max_gap`, and
    `verbose` (Optuna's own line per trial) and `register_model` (a Model Registry name for the logged best model,
    the study's `search.register_model`).
    """
    opts = Options.of(options)
    question = _question(study, opts)
    question.check_inputs(python_inputs(data, model))
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"n_trials must be at least 1; got {n_trials}")
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"timeout must be positive; got {timeout}")
    if timeout == math.inf:
        raise ConfigError("timeout must be finite; got inf (None: no limit)")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1; got {workers}")
    spec = question.spec
    stores = Stores(opts.storage, opts.tracking, opts.tracking_uri)
    inputs = {"data": data, "model": model, "data_dir": question.data_dir, "device": opts.device,
              "plugins": question.plugins}
    job = Job(spec, question.name, _total(n_trials, timeout, spec), timeout, stores, inputs,
              threads=worker_share(workers))
    with callers_threads(), _optuna_quiet(not opts.verbose):
        if workers > 1:  # each worker gets its share of the cores, and never probes beyond it
            set_thread_budget(job.threads)
        return _run(job, workers, progress, opts.registry, question)


def _total(n_trials: int | None, timeout: float | None, spec: StudySpec) -> float:
    """The study's total of finished trials: a budget given to the call replaces the study file's `n_trials`, so
    a timeout alone means "search until then" (unbounded), not "stop at the file's count or then"."""
    if n_trials is not None:
        return n_trials
    return math.inf if timeout is not None else spec.search.n_trials


@contextlib.contextmanager
def _optuna_quiet(quiet: bool) -> Iterator[None]:
    """Optuna's per-trial INFO lines off while the study runs (the caller's verbosity back after)."""
    before = optuna.logging.get_verbosity()
    if quiet and before < optuna.logging.WARNING:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _question(study: str | StudySpec, opts: Options) -> Question:
    """The study this call runs: `--seed` and the `search.*` options go in as `--set` values would, so that a
    stored study is resumed with them or refused for them like any other change."""
    given = {key: search_value(key, value, key) for key, value in (("objective", opts.objective),
                                                                    ("max_gap", opts.max_gap),
                                                                    ("register_model", opts.register_model))
             if value is not None}
    if isinstance(study, StudySpec):
        if opts.seed is not None:
            study = study.replace(seed=opts.seed)
        if given:
            study = study.replace(search=study.search.replace(**given))
        overrides: list[tuple[str, Any]] = []
    else:
        overrides = [*_pairs(opts.overrides), *([("seed", str(opts.seed))] if opts.seed is not None else []),
                     *search_overrides(given)]
    return ask(study, study_name=opts.study_name, storage=opts.storage, overrides=overrides,
               plugins=tuple(opts.plugins), data_dir=opts.data_dir)


def _pairs(overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] | Sequence[str]) -> list[tuple[str, Any]]:
    """`overrides` as (key, value) pairs: a mapping, pairs, or "key=value" texts as `--set` takes them."""
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    if isinstance(overrides, str):
        overrides = [overrides]
    pairs = []
    for item in overrides:
        if isinstance(item, str) and "=" in item and item.partition("=")[0].strip():
            key, _, value = item.partition("=")
            pairs.append((key.strip(), value))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            pairs.append((item[0], item[1]))
        else:
            raise ConfigError(f"overrides: expected a mapping, (key, value) pairs or 'key=value' texts such as "
                              f"'training.epochs=5'; got {item!r}")
    return pairs


def _run(job: Job, workers: int, progress: Progress | None, registry: RegularizerRegistry | None,
         question: Question) -> optuna.Study:
    """Prepare, attach, run this process's trials (and the workers'), then the final test and the summary."""
    # MLflow's set-up (import, store creation) runs in the tracking process while data and model are prepared
    early = start_tracking(job.stores, job.name)
    try:
        exp = prepare(job.spec, registry=registry, **job.inputs)
        given = python_inputs(job.inputs["data"], job.inputs["model"])
        study, tracker = attach(exp.spec, job.name, job.stores, create=True, tracker=early,
                                model_space=exp.model_space,
                                remember=lambda opened: question.remember(opened, exp.data, given))
    except BaseException:
        if early is not None:
            early.close(wait=False)
        raise
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    _announce(job, study, finished, workers)
    if progress is not None and finished < job.total:
        progress.start(job.name, finished, job.total)
    keep_dir = tempfile.mkdtemp(prefix="regsearch-best-") if workers > 1 else None
    objective = Objective(exp, job.name, tracker, None, job.total, keep_dir)
    interrupted = gave_up = False
    try:
        if finished < job.total:
            gave_up = _run_trials(study, objective, dataclasses.replace(job, keep_dir=keep_dir), workers, progress)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if progress is not None:
            progress.close()
        try:
            if not interrupted and not gave_up:
                _final_report(study, exp, objective, tracker)
                if tracker is not None:
                    tracker.log_report()
        finally:
            if keep_dir:
                shutil.rmtree(keep_dir, ignore_errors=True)
            if tracker is not None:
                tracker.end_parent("KILLED" if interrupted else "FINISHED")
                _warn_missing_runs(tracker.close(), job)
    if gave_up:
        raise _gave_up(study, job)
    confirm_at_end(study, exp, job.stores)
    return study


def _announce(job: Job, study: optuna.Study, finished: int, workers: int) -> None:
    if finished < job.total:
        if math.isfinite(job.total):
            done, rest = f"{finished} of {job.total}", "the rest"
        else:
            done, rest = f"{finished}", f"more for {job.timeout:g} s"
        logger.info("study %s: %s trials finished; running %s (storage %s%s)", job.name, done, rest,
                    describe_storage(job.stores.storage), f", {workers} workers" if workers > 1 else "")
    else:
        logger.info("study %s: %d of %d trials finished; nothing to run (a larger --n-trials runs more)", job.name,
                    finished, job.total)
    if job.spec.search.objective == "pareto":
        logger.info("objective pareto: maximize val_acc, minimize gap_acc; no pruning (Optuna cannot prune "
                    "multi-objective studies)")


def _run_trials(study: optuna.Study, objective: Objective, job: Job, workers: int, progress: Progress | None
                ) -> bool:
    """This process's trials and, with `workers` > 1, the other workers'; True when the study was given up."""
    if workers == 1:
        return run_trials(study, objective, job.total, job.timeout, progress).gave_up
    return run_workers(study, job, workers, progress,
                       lambda follower: run_trials(study, objective, job.total, job.timeout, follower))


def _warn_missing_runs(count: int | None, job: Job) -> None:
    """One line at the study's end when MLflow lacks some of its trials, with the command that logs them."""
    if not count:
        return
    command = ["regsearch", "sync", "--study", job.name]
    for option, value in (("--storage", job.stores.storage), ("--tracking-uri", job.stores.tracking_uri)):
        if value:
            command += [option, mask_url(value)]
    logger.warning("%d trial%s not in MLflow (no run, or one left RUNNING); `%s` logs them from the Optuna "
                   "storage once the tracking store takes them", count, " is" if count == 1 else "s are",
                   shlex.join(command))


def _gave_up(study: optuna.Study, job: Job) -> StudyError:
    failed = [t for t in study.get_trials(deepcopy=False, states=(FAIL,))
              if t.user_attrs.get(FAIL_REASON_ATTR, SURPLUS) != SURPLUS]
    last = failed[-1].user_attrs[FAIL_REASON_ATTR] if failed else "unknown"
    return StudyError(f"study {job.name!r} stopped: {job.spec.search.max_consecutive_failures} trials failed in a "
                      f"row; the last: {last}")


def _best_model(exp: Experiment, objective: Objective, best: optuna.trial.FrozenTrial) -> nn.Module:
    """The best trial's trained model: kept by this process, saved by a worker, or trained again."""
    kept = os.path.join(objective.keep_dir, f"trial-{best.number}.pt") if objective.keep_dir else None
    if objective.best is not None and objective.best[1] == best.number:
        return objective.best[2]
    if kept and os.path.exists(kept):
        model = rebuild(exp, best)[0]
        model.load_state_dict(torch.load(kept, map_location=exp.device))
        return model
    logger.info("retraining the best trial (%d) of an earlier run for the test report", best.number)
    return retrain(exp, best)


def _final_report(study: optuna.Study, exp: Experiment, objective: Objective, tracker: Tracking | None) -> None:
    """Evaluate the best trial on the test split once and log it, with its model, on the parent run.

    The best trial is `best_trial`'s: feasible under a gap constraint, the front's best val_acc for pareto
    (whose front is logged too). With no such trial, nothing is tested or logged.
    """
    if tracker is not None and is_pareto(study):
        tracker.log_pareto_front(pareto_front(study))
    best = best_trial(study)
    if best is None:
        return
    reference = stored_reference(study, exp.spec, exp.data)
    if exp.data.y_test is None:  # the user's own data without a test split: the sentence, without test accuracy
        study.set_user_attr(SUMMARY_ATTR, "\n".join([summary_sentence(study, exp.spec, best, None),
                                                     *reference_summary(study, reference, best, None)]))
        return
    parent = tracker.parent_run_id() if tracker is not None else None
    done = study.user_attrs.get(TEST_ATTR) or {}
    if done.get("trial") == best.number and done.get("mlflow_run_id") == parent:
        return  # this best trial's test score and model are already on this study run
    model = _best_model(exp, objective, best)
    autocast = stored_autocast(exp, best)
    test_loss, test_acc = test_score(exp, model, autocast)
    study.set_user_attr(TEST_ATTR, {"trial": best.number, "test_acc": test_acc, "test_loss": test_loss,
                                    "mlflow_run_id": parent})
    sentence = "\n".join([summary_sentence(study, exp.spec, best, test_acc),
                          *reference_summary(study, reference, best, test_acc)])
    study.set_user_attr(SUMMARY_ATTR, sentence)
    if tracker is None:
        return
    gaps = {f"best_{k}": v for k, v in best.user_attrs.get(METRIC_ATTR, {}).items() if k.startswith("gap")}
    tracker.log_summary({"best_val_acc": trial_val_acc(best), "best_test_acc": test_acc, "best_test_loss": test_loss,
                         **gaps, **reference_metrics(reference)},
                        {"best_trial": str(best.number), "regsearch.summary": sentence})
    predictor = Predictor.of(model, exp.data, autocast=autocast, batch_size=exp.spec.training.eval_batch_size)
    tracker.log_model(predictor, predictor.example(exp.data),
                      registration(exp.spec.search.register_model, study.study_name, best.number, test_acc))

