"""Running a study: prepare once per process, then one objective call per Optuna trial."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
import torch
from torch import nn

from regsearch._errors import ConfigError, PluginError, RegsearchError, StudyError
from regsearch._registry import RegularizerRegistry, default_registry
from regsearch._regularizer import NamespacedTrial, Regularizer, TrialContext
from regsearch._spec import RegularizerSpec, StudySpec, load_study
from regsearch._storage import describe_storage, open_storage
from regsearch._tracking import Tracker, default_tracking_uri
from regsearch._trainer import Applied, TrialDiverged, build_optimizer, evaluate, fit, resolve_device
from regsearch.data._tensors import Batcher, TensorData, load_dataset
from regsearch.models import model_factory
from regsearch.surgery import trace

logger = logging.getLogger("regsearch")

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
"""Trials that count toward `n_trials` (failed ones are retried, not counted)."""
METRIC_ATTR = "metrics"
FAIL_REASON_ATTR = "fail_reason"
TEST_ATTR = "best_test"


def trial_seed(study_seed: int, number: int) -> int:
    """Each trial's seed, derived from the study's seed and the trial number (logged on the trial)."""
    return (study_seed * 1_000_003 + number * 7_919 + 17) % (2**31 - 1)


class Progress(Protocol):
    """What a front end (the CLI's progress bar) is told while a study runs."""

    def start(self, study_name: str, finished: int, total: int) -> None: ...

    def trial_done(self, trial: optuna.trial.FrozenTrial, study: optuna.Study) -> None: ...

    def close(self) -> None: ...


@dataclass
class Experiment:
    """Everything a trial needs, prepared once per process."""

    spec: StudySpec
    data: TensorData
    build_model: Callable[[], nn.Module]
    regularizers: list[tuple[RegularizerSpec, Regularizer]]
    device: torch.device
    example: torch.Tensor


class _RecordingTrial:
    """Answers suggestions with a mid-range value and records the distributions (checks and listings)."""

    number = 0

    def __init__(self) -> None:
        self.distributions: dict[str, optuna.distributions.BaseDistribution] = {}
        self.params: dict[str, Any] = {}

    def _record(self, name: str, dist: optuna.distributions.BaseDistribution, value: Any) -> Any:
        if name in self.distributions and self.distributions[name] != dist:
            raise PluginError(f"parameter {name!r} is suggested twice with different ranges: "
                              f"{self.distributions[name]} and {dist}")
        self.distributions[name] = dist
        self.params.setdefault(name, value)
        return self.params[name]

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        dist = optuna.distributions.FloatDistribution(low, high, log=log, step=step)
        mid = math.sqrt(low * high) if log else (low + high) / 2
        return self._record(name, dist, mid)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        dist = optuna.distributions.IntDistribution(low, high, log=log, step=step)
        return self._record(name, dist, low)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        dist = optuna.distributions.CategoricalDistribution(list(choices))
        return self._record(name, dist, list(choices)[0])

    def set_user_attr(self, key: str, value: Any) -> None:
        pass

    def report(self, value: float, step: int) -> None:
        pass

    def should_prune(self) -> bool:
        return False


def _who(rspec: RegularizerSpec, registry: RegularizerRegistry) -> str:
    info = registry.get(rspec.name) if rspec.name in registry else None
    return f"regularizer {rspec.name!r} ({info.source if info else '?'})"


def _context(exp: Experiment, model: nn.Module, number: int, seed: int) -> TrialContext:
    return TrialContext(example_input=exp.example, device=exp.device, trial_number=number, seed=seed,
                        model=model, sites=trace(model, exp.example))


def build_trial(exp: Experiment, trial: Any, seed: int) -> tuple[nn.Module, list[Applied], float]:
    """Suggest this trial's parameters, build the model and let each switched-on regularizer change it."""
    torch.manual_seed(seed)
    model = exp.build_model().to(exp.device)
    context = _context(exp, model, trial.number, seed)
    applied = []
    for rspec, reg in exp.regularizers:
        on = rspec.enabled == "on" or (
            rspec.enabled == "search" and trial.suggest_categorical(f"{rspec.name}.enabled", [True, False]))
        if on:
            reg.context = context
            params = reg.search_space(NamespacedTrial(trial, rspec.name))
            applied.append(Applied(reg, dict(params or {})))
    lr = exp.spec.training.lr.suggest(trial, "lr")
    for a in sorted(applied, key=lambda a: a.regularizer.transform_order):
        model = a.regularizer.transform_model(model, a.params)
        if not isinstance(model, nn.Module):
            raise PluginError(f"regularizer {a.regularizer.name!r}: transform_model returned "
                              f"{type(model).__name__}, not an nn.Module")
    return model.to(exp.device), applied, lr


def preflight(exp: Experiment, registry: RegularizerRegistry) -> float:
    """Run every regularizer's hooks once on a real batch before any trial; returns seconds per train step.

    A plugin that breaks the contract (bad search space, a hook raising, a penalty that is not a scalar on the
    training device) is reported here, naming the plugin, instead of failing every trial.
    """
    spec = exp.spec
    model = exp.build_model().to(exp.device)
    context = _context(exp, model, 0, spec.seed)
    applied = []
    for rspec, reg in exp.regularizers:
        who = _who(rspec, registry)
        step = "search_space"
        try:
            reg.context = context
            recorder = _RecordingTrial()
            params = reg.search_space(NamespacedTrial(recorder, rspec.name))
            if params is not None and not isinstance(params, Mapping):
                raise PluginError(f"search_space returned {type(params).__name__}, not a dict")
            applied.append(Applied(reg, dict(params or {})))
            step = "transform_model"
            model = reg.transform_model(model, applied[-1].params)
            if not isinstance(model, nn.Module):
                raise PluginError(f"transform_model returned {type(model).__name__}, not an nn.Module")
            model = model.to(exp.device)
        except ConfigError as exc:
            raise ConfigError(f"regularizers.{rspec.name}: {exc}") from None
        except Exception as exc:
            raise PluginError(f"{who}: {step} failed: {type(exc).__name__}: {exc}") from exc
    batch = min(spec.training.batch_size, len(exp.data.y_train))
    batcher = Batcher(exp.data)
    x = batcher.inputs(exp.data.x_train[:batch], augment=spec.training.augment and exp.data.is_image)
    y = exp.data.y_train[:batch]
    try:
        optimizer = build_optimizer(model, applied, spec.training, spec.training.lr.low)
    except Exception as exc:
        raise PluginError(f"building the optimizer from the regularizers' parameter groups failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    model.train()
    def step() -> float:
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        for (rspec, reg), a in zip(exp.regularizers, applied):
            try:
                term = reg.penalty(model, a.params)
            except Exception as exc:
                raise PluginError(f"{_who(rspec, registry)}: penalty failed: {type(exc).__name__}: {exc}") from exc
            if term is None:
                continue
            if not isinstance(term, torch.Tensor) or term.numel() != 1 or term.ndim > 1:
                shape = tuple(term.shape) if isinstance(term, torch.Tensor) else type(term).__name__
                raise PluginError(f"{_who(rspec, registry)}: penalty must return a scalar tensor or None; got {shape}")
            if term.device != loss.device:
                raise PluginError(f"{_who(rspec, registry)}: penalty returned a tensor on {term.device}, the model "
                                  f"trains on {loss.device}")
            loss = loss + term.reshape(())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return time.perf_counter() - start

    step()
    seconds = _fastest_threads(step) if exp.device.type == "cpu" else min(step() for _ in range(2))
    for _, reg in exp.regularizers:
        reg.context = None
    return seconds


def _fastest_threads(step: Callable[[], float]) -> float:
    """Keep torch's CPU thread count, or drop to one thread where that trains faster; returns s per step.

    Small models spend a step mostly in thread synchronisation: one thread ran a digits MLP step 5x faster
    than two on this project's 2-core machine under load. An explicit OMP_NUM_THREADS is left alone.
    """
    threads = torch.get_num_threads()
    if threads == 1 or os.environ.get("OMP_NUM_THREADS"):
        return min(step() for _ in range(3))
    many = min(step() for _ in range(3))
    torch.set_num_threads(1)
    one = min(step() for _ in range(3))
    if one <= many:
        logger.debug("training on 1 CPU thread (%.2f ms per step, %d threads: %.2f ms)", one * 1e3, threads,
                     many * 1e3)
        return one
    torch.set_num_threads(threads)
    return many


def _sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    s = spec.search.sampler
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Pinned, not left to version defaults: multivariate TPE with groups handles the conditional spaces of
    # on/off switches; the constant liar keeps parallel workers from sampling the same point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group`, stable in practice
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials, multivariate=True,
                                          group=True, constant_liar=True)


def _pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.search.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=spec.training.epochs,
                                              reduction_factor=p.reduction_factor)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource,
                                                      reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def fixed_settings(spec: StudySpec) -> dict[str, Any]:
    """The study-wide settings logged on the parent run."""
    t = spec.training
    return {"study_file": spec.source, "data": spec.data.name, "model": spec.model.name,
            **{f"model.{k}": v for k, v in spec.model.options.items()},
            "epochs": t.epochs, "batch_size": t.batch_size, "optimizer": t.optimizer, "lr": str(t.lr),
            "schedule": t.schedule, "augment": t.augment, "seed": spec.seed,
            "regularizers": ", ".join(f"{r.name}:{r.enabled}" for r in spec.regularizers) or "none"}


class _Objective:
    def __init__(self, exp: Experiment, study_name: str, tracker: Tracker | None, parent_run_id: str | None):
        self.exp = exp
        self.study_name = study_name
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.best: tuple[float, int, nn.Module] | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        seed = trial_seed(self.exp.spec.seed, trial.number)
        trial.set_user_attr("seed", seed)
        tracker = self.tracker
        run_id = tracker.start_trial(self.parent_run_id, trial.number, self.study_name) if tracker else None
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
        status, tags = "FAILED", {"regsearch.state": "FAIL"}
        try:
            model, applied, lr = build_trial(self.exp, trial, seed)
            if tracker:
                tracker.log_params(run_id, {**trial.params, "seed": seed})

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                if tracker:
                    tracker.log_epoch(run_id, epoch, metrics)
                trial.report(metrics["val_acc"], epoch)
                if trial.should_prune():
                    trial.set_user_attr(METRIC_ATTR, metrics)
                    trial.set_user_attr("epochs", epoch)
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_acc {metrics['val_acc']:.4f})")

            metrics = fit(model, self.exp.data, applied, self.exp.spec.training, lr=lr, device=self.exp.device,
                          seed=seed, on_epoch=on_epoch)
            trial.set_user_attr(METRIC_ATTR, metrics)
            trial.set_user_attr("epochs", self.exp.spec.training.epochs)
            if self.best is None or metrics["val_acc"] > self.best[0]:
                self.best = (metrics["val_acc"], trial.number, model)
            status, tags = "FINISHED", {"regsearch.state": "COMPLETE"}
            return metrics["val_acc"]
        except optuna.TrialPruned as exc:
            status, tags = "KILLED", {"regsearch.state": "PRUNED", "regsearch.reason": str(exc)}
            raise
        except KeyboardInterrupt:
            status, tags = "KILLED", {"regsearch.state": "FAIL", "regsearch.reason": "interrupted"}
            trial.set_user_attr(FAIL_REASON_ATTR, "interrupted")
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, RegsearchError) else f"{type(exc).__name__}: {exc}"
            tags["regsearch.reason"] = reason
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            logger.warning("trial %d failed: %s", trial.number, reason)
            raise
        finally:
            if tracker:
                tracker.end_trial(run_id, status, tags)


class _StopWhenDone:
    """Stops this worker once the study holds `total` finished trials, or after too many failures in a row."""

    def __init__(self, total: int, max_failures: int, progress: Progress | None):
        self.total = total
        self.max_failures = max_failures
        self.failures: list[str] = []
        self.progress = progress
        self.gave_up = False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.progress is not None:
            self.progress.trial_done(trial, study)
        if trial.state == optuna.trial.TrialState.FAIL:
            reason = trial.user_attrs.get(FAIL_REASON_ATTR, "unknown")
            if not reason.startswith("loss is NaN"):  # divergence is the search's business, not a broken setup
                self.failures.append(reason)
        else:
            self.failures.clear()
        if len(self.failures) >= self.max_failures:
            self.gave_up = True
            study.stop()
        elif len(study.get_trials(deepcopy=False, states=FINISHED)) >= self.total:
            study.stop()


def prepare(spec: StudySpec, *, data: TensorData | None = None, model: Callable[[], nn.Module] | None = None,
            data_dir: str | None = None, device: str = "auto", registry: RegularizerRegistry | None = None,
            plugins: Iterable[str] = ()) -> Experiment:
    """Load plugins, data and model factory once, and check every regularizer against them."""
    registry = registry or default_registry()
    for path in (*spec.plugins, *plugins):
        registry.load_file(path)
    regs = [(r, registry.create(r.name, r.options)) for r in spec.regularizers]
    dev = resolve_device(device)
    if data is None:
        data = load_dataset(spec.data.name, val_fraction=spec.data.val_fraction, seed=spec.seed,
                            train_size=spec.data.train_size, data_dir=data_dir)
    data = data.to(dev)
    if model is None:
        build = model_factory(spec.model.name, spec.model.options, data.input_shape, data.num_classes)
    else:
        build = model
    batcher = Batcher(data)
    example = batcher.inputs(data.x_train[:4])
    exp = Experiment(spec, data, build, regs, dev, example)
    try:
        probe = build().to(dev)
        probe.eval()
        with torch.no_grad():
            out = probe(example)
    except Exception as exc:
        raise ConfigError(f"the model cannot take this data (inputs of shape {tuple(data.input_shape)}): "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != data.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model must return logits of shape (batch, {data.num_classes}); got {shape}")
    step_s = preflight(exp, registry)
    steps = math.ceil(len(data.y_train) / spec.training.batch_size)
    trial_s = step_s * steps * spec.training.epochs
    if dev.type == "cpu" and trial_s > 300:
        logger.warning(
            "on this CPU one trial will take about %.0f min (%d epochs x %d training examples, %.2f s per batch "
            "of %d). To shrink the study: --set data.train_size=5000 --set training.epochs=5, or run on a GPU.",
            trial_s / 60, spec.training.epochs, len(data.y_train), step_s, spec.training.batch_size)
    return exp


def optimize(study: str | StudySpec, *, n_trials: int | None = None, timeout: float | None = None,
             storage: str | None = None, tracking_uri: str | None = None, tracking: bool = True,
             study_name: str | None = None, data_dir: str | None = None, device: str = "auto",
             seed: int | None = None, overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] = (),
             plugins: Iterable[str] = (), data: TensorData | None = None,
             model: Callable[[], nn.Module] | None = None, registry: RegularizerRegistry | None = None,
             progress: Progress | None = None) -> optuna.Study:
    """Run (or resume) a study until it holds `n_trials` finished trials in total; returns the Optuna study.

    `study` is a shipped study's name, a study file's path or a `StudySpec`. `data` (a `TensorData`) and
    `model` (a zero-argument factory of your own `nn.Module`) replace the study's dataset and model.
    """
    spec = study if isinstance(study, StudySpec) else load_study(study, overrides)
    if seed is not None:
        spec = dataclasses.replace(spec, seed=seed)
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"n_trials must be at least 1; got {n_trials}")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"timeout must be positive; got {timeout}")
    total = n_trials or spec.search.n_trials
    name = study_name or spec.name
    exp = prepare(spec, data=data, model=model, data_dir=data_dir, device=device, registry=registry,
                  plugins=plugins)
    optuna_storage = open_storage(storage)
    try:
        created = optuna.create_study(storage=optuna_storage, study_name=name, direction="maximize",
                                      load_if_exists=True)
    except Exception as exc:
        raise StudyError(f"cannot create study {name!r} in {describe_storage(storage)}: {exc}") from exc
    if created.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"study {name!r} in {describe_storage(storage)} is not a regsearch study (it minimizes)")
    already = len(created.trials)
    opt_study = optuna.load_study(study_name=name, storage=optuna_storage,
                                  sampler=_sampler(spec, spec.seed + already), pruner=_pruner(spec))
    opt_study.set_user_attr("regsearch.source", spec.source)
    tracker = parent = None
    if tracking:
        uri = tracking_uri or default_tracking_uri()
        try:
            tracker = Tracker(uri, name)
            parent = tracker.parent_run(opt_study, name, fixed_settings(spec))
        except Exception as exc:
            from regsearch._storage import mask_url

            raise ConfigError(f"--tracking-uri {mask_url(uri)}: cannot use the MLflow tracking store: "
                              f"{mask_url(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finished = len(opt_study.get_trials(deepcopy=False, states=FINISHED))
    objective = _Objective(exp, name, tracker, parent)
    stopper = _StopWhenDone(total, spec.search.max_consecutive_failures, progress)
    if finished < total:
        logger.info("study %s: %d of %d trials finished; running the rest (storage %s)", name, finished, total,
                    describe_storage(storage))
    if progress is not None:
        progress.start(name, finished, total)
    interrupted = False
    try:
        if finished < total:
            opt_study.optimize(objective, timeout=timeout, catch=(Exception,), callbacks=[stopper])
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if progress is not None:
            progress.close()
        try:
            if not interrupted and not stopper.gave_up:
                _final_report(opt_study, exp, objective, tracker, parent)
        finally:
            if tracker is not None:
                tracker.end_parent(parent, "KILLED" if interrupted else "FINISHED")
                tracker.close()
    if stopper.gave_up:
        raise StudyError(f"study {name!r} stopped: {len(stopper.failures)} trials failed in a row; the last: "
                         f"{stopper.failures[-1]}")
    return opt_study


def retrain(exp: Experiment, trial: optuna.trial.FrozenTrial) -> nn.Module:
    """Train a stored trial again from its parameters and seed (the same model on CPU)."""
    fixed = optuna.trial.FixedTrial(trial.params, number=trial.number)
    seed = trial.user_attrs.get("seed", trial_seed(exp.spec.seed, trial.number))
    model, applied, lr = build_trial(exp, fixed, seed)
    fit(model, exp.data, applied, exp.spec.training, lr=lr, device=exp.device, seed=seed)
    return model


def _final_report(study: optuna.Study, exp: Experiment, objective: _Objective, tracker: Tracker | None,
                  parent: str | None) -> None:
    """Evaluate the best trial on the test split once and log it, with its model, on the parent run."""
    try:
        best = study.best_trial
    except ValueError:
        return
    if exp.data.y_test is None:
        return
    done = study.user_attrs.get(TEST_ATTR) or {}
    if done.get("trial") == best.number and done.get("mlflow_run_id") == parent:
        return  # this best trial's test score and model are already on this study run
    if objective.best is not None and objective.best[1] == best.number:
        model = objective.best[2]
    else:
        logger.info("retraining the best trial (%d) of an earlier run for the test report", best.number)
        model = retrain(exp, best)
    batcher = Batcher(exp.data)
    test_loss, test_acc = evaluate(model, batcher, exp.data.x_test, exp.data.y_test,
                                   exp.spec.training.eval_batch_size)
    result = {"trial": best.number, "test_acc": test_acc, "test_loss": test_loss, "mlflow_run_id": parent}
    study.set_user_attr(TEST_ATTR, result)
    if tracker is None:
        return
    metrics = best.user_attrs.get(METRIC_ATTR, {})
    tracker.log_summary(parent, {"best_val_acc": best.value, "best_test_acc": test_acc, "best_test_loss": test_loss,
                                 **{f"best_{k}": v for k, v in metrics.items() if k.startswith("gap")}},
                        {"best_trial": str(best.number)})
    tracker.log_model(parent, copy.deepcopy(model), exp.example[:2])


def leaderboard(study: optuna.Study, top: int = 5) -> list[dict[str, Any]]:
    """The best finished trials, best first: number, state, val_acc, gap_acc, train_acc, params."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        m = t.user_attrs.get(METRIC_ATTR, {})
        val = t.value if t.value is not None else m.get("val_acc")
        rows.append({"number": t.number, "state": t.state.name, "val_acc": val, "gap_acc": m.get("gap_acc"),
                     "train_acc": m.get("train_acc"), "epochs": t.user_attrs.get("epochs"), "params": t.params})
    rows.sort(key=lambda r: (r["state"] != "COMPLETE", -(r["val_acc"] or 0)))
    return rows[:top]


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def load_stored_study(study: str, storage: str | None = None, study_name: str | None = None) -> optuna.Study:
    """A stored study by its study file/name (or explicit study name), for `show`."""
    name = study_name
    if name is None:
        from pathlib import Path

        name = Path(study).stem if study.endswith((".yaml", ".yml")) else study
    optuna_storage = open_storage(storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(optuna_storage, include_best_trial=False)]
    if name not in names:
        from regsearch._errors import unknown_name

        raise ConfigError(unknown_name(f"study in {describe_storage(storage)}:", name, names))
    return optuna.load_study(study_name=name, storage=optuna_storage)
