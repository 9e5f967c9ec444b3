"""Running a study: prepare once per process, then one objective call per Optuna trial."""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
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
from regsearch._regularizer import LoopState, NamespacedTrial, Regularizer, TrialContext
from regsearch._spec import RegularizerSpec, StudySpec, TrainingSpec, search_value
from regsearch._storage import describe_storage, mask_url, open_storage
from regsearch._study_file import load_study
from regsearch._tracking import TrackerProcess, default_tracking_uri
from regsearch._trainer import (PINNED, Applied, _transformed, autocast_context, build_optimizer, evaluate, fit,
                                native_bf16, precision_name, resolve_device, set_thread_budget, training_autocast)
from regsearch.data._tensors import Batcher, TensorData, load_dataset
from regsearch.models import model_factory
from regsearch.surgery import trace

logger = logging.getLogger("regsearch")

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
"""Trials that count toward `n_trials` (failed ones are retried, not counted)."""
RUNNING = optuna.trial.TrialState.RUNNING
WORKER_ATTR = "worker"
SURPLUS = "surplus: the study already had its total when this trial started"
METRIC_ATTR = "metrics"
FAIL_REASON_ATTR = "fail_reason"
TEST_ATTR = "best_test"
CURVE_ATTR = "curve"
"""Per-epoch eval-mode metrics of a trial (a list of dicts with `epoch`), for reports without MLflow."""
BASELINE_ATTR = "baseline"
"""True on the study's unregularized baseline trial (every regularizer off)."""
TEST_ACC_ATTR = "test_acc"
"""The baseline trial's test accuracy (the best trial's is the study's `best_test`)."""
PRECISION_ATTR = "precision"
"""A trial's user attribute (and MLflow parameter): the precision it trained in, float32 or bfloat16."""
SUMMARY_ATTR = "summary"
"""The study's finding in one sentence (a study user attr, printed by `optimize` and `show`)."""
OBJECTIVE_ATTR = "regsearch.objective"
"""The study's objective (`val_acc` or `pareto`), fixed when the study is created."""
MAX_GAP_ATTR = "regsearch.max_gap"
"""The study's gap constraint (gap_acc <= max_gap; None: none), fixed when the study is created."""
GAP_CONSTRAINT = "gap_acc"
"""The Optuna constraint key of a trial: gap_acc - max_gap (feasible when <= 0)."""


def is_pareto(study: optuna.Study) -> bool:
    """Whether the study has two objectives (val_acc up, gap_acc down)."""
    return len(study.directions) > 1


def study_max_gap(study: optuna.Study) -> float | None:
    return study.user_attrs.get(MAX_GAP_ATTR)


def trial_val_acc(trial: optuna.trial.FrozenTrial) -> float | None:
    """The trial's validation accuracy: its (first) objective value, else its last metrics (pruned trials)."""
    if trial.values:
        return trial.values[0]
    return (trial.user_attrs.get(METRIC_ATTR) or {}).get("val_acc")


def trial_gap_acc(trial: optuna.trial.FrozenTrial) -> float | None:
    if trial.values and len(trial.values) > 1:
        return trial.values[1]
    return (trial.user_attrs.get(METRIC_ATTR) or {}).get("gap_acc")


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Optuna's rule: every constraint value <= 0 (a trial without constraints is feasible)."""
    return all(v <= 0.0 for v in trial.constraints.values())


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial regsearch reports, tests and logs; None when no complete trial qualifies.

    Single objective: Optuna's best trial, which is the best feasible one under a gap constraint. Pareto: the
    front's trial with the highest val_acc (ties: the lower gap, then the earlier trial).
    """
    if is_pareto(study):
        front = study.best_trials
        return max(front, key=lambda t: (t.values[0], -t.values[1], -t.number)) if front else None
    try:
        return study.best_trial
    except ValueError:  # no complete trial, or none feasible
        return None


def pareto_front(study: optuna.Study) -> list[dict[str, Any]]:
    """The Pareto front (Optuna's best trials), highest val_acc first: trial, val_acc, gap_acc, params."""
    front = sorted(study.best_trials, key=lambda t: (-t.values[0], t.values[1], t.number))
    return [{"trial": t.number, "val_acc": t.values[0], "gap_acc": t.values[1], "params": t.params} for t in front]


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


def is_baseline(trial: Any) -> bool:
    """Whether a trial (frozen or running) is the study's unregularized baseline."""
    return bool(getattr(trial, "user_attrs", {}).get(BASELINE_ATTR))


def training_for(exp: Experiment, trial: Any) -> TrainingSpec:
    """The study's training recipe; the baseline trial trains without label smoothing (unregularized)."""
    if is_baseline(trial):
        return exp.spec.training.replace(label_smoothing=0.0)
    return exp.spec.training


def baseline_params(spec: StudySpec) -> dict[str, Any]:
    """The baseline trial's parameters: only the learning rate (the first trial's, else mid-range)."""
    lr = spec.training.lr
    if lr.fixed:
        return {}
    if "lr" in spec.search.first_trial:
        return {"lr": spec.search.first_trial["lr"]}
    return {"lr": math.sqrt(lr.low * lr.high) if lr.log else (lr.low + lr.high) / 2}


def build_trial(exp: Experiment, trial: Any, seed: int, *, baseline: bool = False
                ) -> tuple[nn.Module, list[Applied], float]:
    """Suggest this trial's parameters, build the model and let each switched-on regularizer change it.

    The baseline trial (`baseline=True`) switches every regularizer off, also those the study pins on.
    """
    torch.manual_seed(seed)
    model = exp.build_model().to(exp.device)
    context = _context(exp, model, trial.number, seed)
    applied = []
    chosen = {}
    if baseline:
        return model, applied, exp.spec.training.lr.suggest(trial, "lr")
    for rspec, _ in exp.regularizers:  # a choice group: one categorical, "none" or one of its members
        if rspec.choice is not None and rspec.enabled == "search" and rspec.choice not in chosen:
            members = [r.name for r, _ in exp.regularizers if r.choice == rspec.choice and r.enabled == "search"]
            chosen[rspec.choice] = trial.suggest_categorical(f"choice.{rspec.choice}", ["none", *members])
    for rspec, reg in exp.regularizers:
        if rspec.choice is not None and rspec.enabled == "search":
            on = chosen[rspec.choice] == rspec.name
        else:
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
    autocast = training_autocast(spec.training, exp.device, model, exp.data)
    batch = min(spec.training.batch_size, len(exp.data.y_train))
    batcher = Batcher(exp.data)
    x = batcher.inputs(exp.data.x_train[:batch])
    y = exp.data.y_train[:batch]
    try:
        optimizer = build_optimizer(model, applied, spec.training, spec.training.lr.low)
    except Exception as exc:
        raise PluginError(f"building the optimizer from the regularizers' parameter groups failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    state = LoopState(model=model, optimizer=optimizer, epochs=spec.training.epochs,
                      num_classes=exp.data.num_classes)
    for (rspec, reg), a in zip(exp.regularizers, applied):
        if getattr(type(reg), "transform_batch") is getattr(Regularizer, "transform_batch"):
            continue
        try:  # a batch transform that breaks is reported here, naming the plugin, not in every trial
            reg.on_train_start(state, a.params)
            x, y = _transformed(a, x, y, checked=False)
            reg.on_train_end(state, a.params)
        except ConfigError as exc:
            raise ConfigError(f"regularizers.{rspec.name}: {exc}") from None
        except Exception as exc:
            raise PluginError(f"{_who(rspec, registry)}: transform_batch failed: {type(exc).__name__}: {exc}") from exc
    model.train()

    def step() -> float:
        start = time.perf_counter()
        with autocast_context(exp.device, autocast):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
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
    if spec.search.objective == "pareto":
        return optuna.pruners.NopPruner()  # Optuna cannot prune multi-objective studies
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
            "schedule": t.schedule, "label_smoothing": t.label_smoothing, "precision": t.precision, "seed": spec.seed,
            "objective": spec.search.objective,
            **({"max_gap": spec.search.max_gap} if spec.search.max_gap is not None else {}),
            "regularizers": ", ".join(f"{r.name}:{r.enabled}" for r in spec.regularizers) or "none"}


class _Objective:
    def __init__(self, exp: Experiment, study_name: str, tracker: TrackerProcess | None, parent_run_id: str | None,
                 total: int, keep_dir: str | None = None):
        self.exp = exp
        self.study_name = study_name
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.total = total
        self.keep_dir = keep_dir
        self.best: tuple[tuple, int, nn.Module] | None = None
        self.pareto = exp.spec.search.objective == "pareto"
        self.max_gap = exp.spec.search.max_gap

    def _rank(self, metrics: Mapping[str, float]) -> tuple:
        """How `best_trial` orders complete trials (a feasible one first), so the kept model is the one tested."""
        if self.pareto:
            return (metrics["val_acc"], -metrics["gap_acc"])
        return (self.max_gap is None or metrics["gap_acc"] <= self.max_gap, metrics["val_acc"])

    def _constrain(self, trial: optuna.Trial, metrics: Mapping[str, float]) -> None:
        """Record the gap constraint (feasible when <= 0), on complete and pruned trials alike: TPE uses both."""
        if self.max_gap is not None:
            trial.set_constraint(GAP_CONSTRAINT, metrics["gap_acc"] - self.max_gap)

    def _keep(self, number: int, rank: tuple, model: nn.Module) -> None:
        """Remember this process's best model (on disk too, for the main process of a multi-worker run)."""
        if self.best is not None and rank <= self.best[0]:
            return
        previous = self.best
        self.best = (rank, number, model)
        if self.keep_dir:
            torch.save(model.state_dict(), os.path.join(self.keep_dir, f"trial-{number}.pt"))
            if previous is not None:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.keep_dir, f"trial-{previous[1]}.pt"))

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})
        ahead = [t for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, RUNNING))
                 if t.number < trial.number]
        if len(ahead) >= self.total:
            # another worker asked for the last trial at the same moment: this one is not needed
            trial.set_user_attr(FAIL_REASON_ATTR, SURPLUS)
            raise _Surplus(SURPLUS)
        seed = trial_seed(self.exp.spec.seed, trial.number)
        trial.set_user_attr("seed", seed)
        tracker = self.tracker
        run = tracker.start_trial(self.parent_run_id, trial.number, self.study_name) if tracker else None
        run_id = None  # known once the tracking process has made the run

        def note_run_id(final: bool = False) -> None:
            nonlocal run_id
            if tracker and run_id is None:
                run_id = tracker.run_id(run, final=final)
                if run_id:
                    trial.set_user_attr("mlflow_run_id", run_id)

        status, tags = "FAILED", {"regsearch.state": "FAIL"}
        baseline = is_baseline(trial)
        try:
            model, applied, lr = build_trial(self.exp, trial, seed, baseline=baseline)
            if tracker:
                tracker.log_params(run, {**trial.params, "seed": seed})
            autocast = training_autocast(self.exp.spec.training, self.exp.device, model, self.exp.data)
            precision = precision_name(autocast)
            trial.set_user_attr(PRECISION_ATTR, precision)
            if tracker:
                tracker.log_params(run, {PRECISION_ATTR: precision})

            ran = [0]
            curve: list[dict[str, float]] = []

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                ran[0] = epoch
                curve.append({"epoch": epoch, **{k: round(v, 6) for k, v in metrics.items()}})
                trial.set_user_attr(CURVE_ATTR, curve)
                if tracker:
                    tracker.log_epoch(run, epoch, metrics)
                    note_run_id()
                if self.pareto:
                    return  # multi-objective trials take no intermediate values (and are never pruned)
                trial.report(metrics["val_acc"], epoch)
                if trial.should_prune():
                    trial.set_user_attr(METRIC_ATTR, metrics)
                    trial.set_user_attr("epochs", epoch)
                    self._constrain(trial, metrics)
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_acc {metrics['val_acc']:.4f})")

            metrics = fit(model, self.exp.data, applied, training_for(self.exp, trial), lr=lr,
                          device=self.exp.device, seed=seed, on_epoch=on_epoch, autocast=autocast)
            trial.set_user_attr(METRIC_ATTR, metrics)
            if baseline and self.exp.data.y_test is not None:  # what the final summary compares against
                trial.set_user_attr(TEST_ACC_ATTR, test_score(self.exp, model, autocast)[1])
            trial.set_user_attr("epochs", ran[0])  # fewer than training.epochs when a plugin stopped early
            self._constrain(trial, metrics)
            self._keep(trial.number, self._rank(metrics), model)
            status, tags = "FINISHED", {"regsearch.state": "COMPLETE"}
            if self.pareto:
                return metrics["val_acc"], metrics["gap_acc"]
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
                note_run_id(final=True)  # stored first: after the run's end, only Optuna's own record follows
                tracker.end_trial(run, status, tags)


class _Surplus(Exception):
    """A trial asked for after the study already had its total (a race between workers)."""


class _StopWhenDone:
    """Stops this worker once finished + running trials reach `total`, or after too many failures in a row.

    Counting running trials (other workers') keeps the study at exactly `total`: a worker does not start a
    trial that another worker's running one will complete. After each trial it also fails the trials of
    workers on this host that died, and queues them again.
    """

    def __init__(self, total: int, max_failures: int, progress: Progress | None, tracker: TrackerProcess | None):
        self.total = total
        self.max_failures = max_failures
        self.failures: list[str] = []
        self.progress = progress
        self.tracker = tracker
        self.gave_up = False
        self.checked: set[int] = set()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.progress is not None:
            self.progress.trial_done(trial, study)
        reason = trial.user_attrs.get(FAIL_REASON_ATTR, "unknown")
        if trial.state == optuna.trial.TrialState.FAIL and reason != SURPLUS:
            self.failures.append(reason)
        elif trial.state != optuna.trial.TrialState.FAIL:
            self.failures.clear()
        recover_dead_trials(study, self.tracker)
        _close_stale_runs(study, self.tracker, self.checked)
        if len(self.failures) >= self.max_failures:
            self.gave_up = True
            study.stop()
        elif reason == SURPLUS or _committed(study) >= self.total:
            study.stop()


def _committed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(*FINISHED, RUNNING)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def recover_dead_trials(study: optuna.Study, tracker: TrackerProcess | None, max_retry: int = 3) -> list[int]:
    """Fail the RUNNING trials whose worker process on this host is gone, and queue each again once.

    Optuna's journal storage has no heartbeat, so a killed worker's trial would stay RUNNING forever; RDB
    storages also have Optuna's heartbeat, which catches workers on other machines.
    """
    host, me = socket.gethostname(), os.getpid()
    dead = [t for t in study.get_trials(deepcopy=False, states=(RUNNING,))
            if (w := t.user_attrs.get(WORKER_ATTR) or {}).get("host") == host and w.get("pid") not in (None, me)
            and not _pid_alive(w["pid"])]
    if not dead:
        return []
    with _recovery_lock(study):
        return _fail_and_retry(study, tracker, [t.number for t in dead], max_retry)


@contextlib.contextmanager
def _recovery_lock(study: optuna.Study):
    """Serialise recovery between the processes sharing a journal file.

    A journal storage takes a second process's FAIL of a trial another process already failed (each appends to
    the log from its own view), so both would queue a retry; under this lock, with the view read afresh, only the
    first does. RDB storages refuse the second FAIL themselves.
    """
    path = getattr(getattr(study._storage, "_backend", None), "_file_path", None)
    if path is None:
        yield
        return
    import fcntl

    with open(f"{path}.recover.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fail_and_retry(study: optuna.Study, tracker: TrackerProcess | None, numbers: list[int],
                    max_retry: int) -> list[int]:
    recovered = []
    for t in study.get_trials(deepcopy=False):  # read afresh: another process may have recovered them meanwhile
        if t.number not in numbers or t.state != RUNNING:
            continue
        worker = t.user_attrs.get(WORKER_ATTR) or {}
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        recovered.append(t.number)
        logger.warning("trial %d: its worker (pid %s) died; the trial is failed and queued again", t.number,
                       worker["pid"])
        if tracker is not None:
            tracker.end_dead_trial(t.user_attrs.get("mlflow_run_id"), t.number, "KILLED",
                                   {"regsearch.state": "FAIL", "regsearch.reason": f"worker pid {worker['pid']} died"})
        # the same retry Optuna's heartbeat applies on RDB storages: a WAITING copy with the same parameters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        retry(study, study._storage.get_trial(t._trial_id))
    return recovered


def _close_stale_runs(study: optuna.Study, tracker: TrackerProcess | None, checked: set[int]) -> None:
    """End the MLflow runs of trials that Optuna's heartbeat failed (they died without closing their run)."""
    if tracker is None:
        return
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if FAIL_REASON_ATTR not in t.user_attrs and t.number not in checked:
            checked.add(t.number)
            tracker.end_dead_trial(t.user_attrs.get("mlflow_run_id"), t.number, "KILLED",
                                   {"regsearch.state": "FAIL", "regsearch.reason": "worker stopped beating"})


def prepare(spec: StudySpec, *, data: TensorData | None = None, model: Callable[[], nn.Module] | None = None,
            data_dir: str | None = None, device: str = "auto", registry: RegularizerRegistry | None = None,
            plugins: Iterable[str] = ()) -> Experiment:
    """Load plugins, data and model factory once, and check every regularizer against them."""
    registry = registry or default_registry()
    for path in (*spec.plugins, *plugins):
        registry.load_file(path)
    regs = [(r, registry.create(r.name, r.options)) for r in spec.regularizers]
    dev = resolve_device(device)
    if spec.training.precision == "bfloat16" and not native_bf16(dev):
        logger.warning("training.precision is bfloat16, but this %s has no native bfloat16 arithmetic (on a CPU: "
                       "AVX512-BF16 or AMX), so trials may run many times slower than in float32; `auto` chooses "
                       "per device", "CPU" if dev.type == "cpu" else f"device ({dev})")
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
             progress: Progress | None = None, workers: int = 1, objective: str | None = None,
             max_gap: float | None = None) -> optuna.Study:
    """Run (or resume) a study until it holds `n_trials` finished trials in total; returns the Optuna study.

    `study` is a shipped study's name, a study file's path or a `StudySpec`. `data` (a `TensorData`) and
    `model` (a zero-argument factory of your own `nn.Module`) replace the study's dataset and model.
    `workers` > 1 runs that many worker processes on this machine (they must be able to pickle `data` and
    `model`); the same call on other machines with a shared `storage` joins the same study. `objective`
    ("val_acc" or "pareto") and `max_gap` (best trials need gap_acc <= max_gap) replace the study's
    `search.objective` and `search.max_gap`.
    """
    spec = study if isinstance(study, StudySpec) else load_study(study, overrides)
    if seed is not None:
        spec = spec.replace(seed=seed)
    given = {key: search_value(key, value, key) for key, value in (("objective", objective), ("max_gap", max_gap))
             if value is not None}
    if given:
        spec = spec.replace(search=spec.search.replace(**given))
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"n_trials must be at least 1; got {n_trials}")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"timeout must be positive; got {timeout}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1; got {workers}")
    total = n_trials or spec.search.n_trials
    name = study_name or spec.name
    caller_threads = torch.get_num_threads()  # trials pick their own; the caller gets its own back
    if workers > 1:  # each worker gets its share of the cores, and never probes beyond it
        set_thread_budget((os.cpu_count() or 1) // workers)
    # MLflow's set-up (import, store creation) runs in the tracking process while data and model are prepared
    early = _start_tracking(tracking_uri, name) if tracking else None
    try:
        exp = prepare(spec, data=data, model=model, data_dir=data_dir, device=device, registry=registry,
                      plugins=plugins)
        opt_study, tracker, parent = _open_study(spec, name, storage, tracking, tracking_uri, create=True,
                                                 tracker=early)
    except BaseException:
        torch.set_num_threads(caller_threads)
        if early is not None:
            early.close(wait=False)
        raise
    finished = len(opt_study.get_trials(deepcopy=False, states=FINISHED))
    if finished < total:
        logger.info("study %s: %d of %d trials finished; running the rest (storage %s%s)", name, finished, total,
                    describe_storage(storage), f", {workers} workers" if workers > 1 else "")
    if spec.search.objective == "pareto":
        logger.info("objective pareto: maximize val_acc, minimize gap_acc; no pruning (Optuna cannot prune "
                    "multi-objective studies)")
    if progress is not None:
        progress.start(name, finished, total)
    keep_dir = tempfile.mkdtemp(prefix="regsearch-best-") if workers > 1 else None
    objective = _Objective(exp, name, tracker, parent, total, keep_dir)
    interrupted = gave_up = False
    try:
        if finished < total and workers == 1:
            stopper = _run_trials(opt_study, objective, total, timeout, spec, progress, tracker)
            gave_up = stopper.gave_up
        elif finished < total:
            job = dict(study=spec, n_trials=total, timeout=timeout, storage=storage, tracking=tracking,
                       tracking_uri=tracking_uri, study_name=name, data_dir=data_dir, device=device, data=data,
                       model=model, plugins=tuple(plugins), keep_dir=keep_dir,
                       threads=max(1, (os.cpu_count() or 1) // workers))
            gave_up = _run_workers(opt_study, job, workers, progress, lambda follower: _run_trials(
                opt_study, objective, total, timeout, spec, follower, tracker))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if progress is not None:
            progress.close()
        try:
            if not interrupted and not gave_up:
                _final_report(opt_study, exp, objective, tracker, parent)
                if tracker is not None:
                    tracker.log_report()
        finally:
            torch.set_num_threads(caller_threads)
            if keep_dir:
                shutil.rmtree(keep_dir, ignore_errors=True)
            if tracker is not None:
                tracker.end_parent("KILLED" if interrupted else "FINISHED")
                tracker.close()
    if gave_up:
        failed = [t for t in opt_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
                  if t.user_attrs.get(FAIL_REASON_ATTR, SURPLUS) != SURPLUS]
        last = failed[-1].user_attrs[FAIL_REASON_ATTR] if failed else "unknown"
        raise StudyError(f"study {name!r} stopped: {spec.search.max_consecutive_failures} trials failed in a row; "
                         f"the last: {last}")
    return opt_study


def _open_study(spec: StudySpec, name: str, storage: str | None, tracking: bool, tracking_uri: str | None,
                *, create: bool, salt: int = 0, tracker: TrackerProcess | None = None
                ) -> tuple[optuna.Study, TrackerProcess | None, str | None]:
    """The Optuna study (created once, by the first process) and its MLflow parent run."""
    optuna_storage = open_storage(storage, heartbeat_interval=spec.search.heartbeat_interval,
                                  grace_period=spec.search.grace_period)
    search = spec.search
    try:
        if create:
            created = optuna.create_study(storage=optuna_storage, study_name=name, load_if_exists=True,
                                          directions=_DIRECTIONS[search.objective])
        else:
            created = optuna.load_study(study_name=name, storage=optuna_storage)
    except Exception as exc:
        raise StudyError(f"cannot open study {name!r} in {describe_storage(storage)}: {exc}") from exc
    _check_objective(created, search.objective, search.max_gap, f"study {name!r} in {describe_storage(storage)}")
    # a different sampler seed per worker and per resume: workers must not replay each other's draws
    sampler_seed = spec.seed + len(created.trials) * 7_919 + salt * 104_729
    opt_study = optuna.load_study(study_name=name, storage=optuna_storage,
                                  sampler=_sampler(spec, sampler_seed % (2**31 - 1)), pruner=_pruner(spec))
    new = create and not created.trials
    if create:
        opt_study.set_user_attr("regsearch.source", spec.source)
        opt_study.set_user_attr(OBJECTIVE_ATTR, search.objective)
        opt_study.set_user_attr(MAX_GAP_ATTR, search.max_gap)
    parent = None
    if tracking:
        tracker = tracker or _start_tracking(tracking_uri, name)
        try:
            tracker.parent_run(opt_study, name, fixed_settings(spec), storage=storage, ends_study=create)
        except Exception as exc:
            tracker.close(wait=False)
            raise _tracking_error(tracker.uri, exc) from None
    # queued only once the tracking store is known to work: a refused start leaves no trial behind
    if create and spec.search.baseline and _baseline_missing(opt_study):
        opt_study.enqueue_trial(baseline_params(spec), user_attrs={BASELINE_ATTR: True})
    if new and spec.search.first_trial:
        opt_study.enqueue_trial(dict(spec.search.first_trial), skip_if_exists=True)
    return opt_study, tracker, parent


def _baseline_missing(study: optuna.Study) -> bool:
    """Whether the study still needs its baseline trial: none is queued, running or finished, and none failed
    on its own (an interrupted or killed one is queued again; a diverging one is not run over and over)."""
    baselines = [t for t in study.get_trials(deepcopy=False) if is_baseline(t)]
    if any(t.state != optuna.trial.TrialState.FAIL for t in baselines):
        return False
    return not any(t.user_attrs.get(FAIL_REASON_ATTR) not in (None, "interrupted") for t in baselines)


_MAX, _MIN = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
_DIRECTIONS = {"val_acc": [_MAX], "pareto": [_MAX, _MIN]}


def _check_objective(study: optuna.Study, objective: str, max_gap: float | None, where: str) -> None:
    """Refuse to resume a study with another objective or gap constraint: its trials would not compare."""
    directions = list(study.directions)
    if directions not in _DIRECTIONS.values():
        shown = ", ".join(d.name.lower() for d in directions)
        raise ConfigError(f"{where} is not a regsearch study (its directions: {shown})")
    stored = study.user_attrs.get(OBJECTIVE_ATTR, "pareto" if len(directions) > 1 else "val_acc")
    if directions != _DIRECTIONS[objective] or stored != objective:
        raise ConfigError(f"{where} was made with objective {stored}; it cannot go on with objective {objective} "
                          f"(use --objective {stored}, or another --study-name)")
    if not study.trials:
        return  # brand new, or a start that was refused before any trial: this process sets its settings
    stored_gap = study.user_attrs.get(MAX_GAP_ATTR)
    if stored_gap != max_gap:
        def shown(gap: float | None) -> str:
            return "no --max-gap" if gap is None else f"--max-gap {gap:g}"
        raise ConfigError(f"{where} was made with {shown(stored_gap)}; it cannot go on with {shown(max_gap)} "
                          f"(use the same, or another --study-name)")


def _start_tracking(tracking_uri: str | None, name: str) -> TrackerProcess:
    uri = tracking_uri or default_tracking_uri()
    try:
        return TrackerProcess(uri, name)
    except Exception as exc:
        raise _tracking_error(uri, exc) from None


def _tracking_error(uri: str, exc: BaseException) -> ConfigError:
    return ConfigError(f"--tracking-uri {mask_url(uri)}: cannot use the MLflow tracking store: "
                       f"{mask_url(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__}")


def _run_trials(study: optuna.Study, objective: _Objective, total: int, timeout: float | None, spec: StudySpec,
                progress: Progress | None, tracker: TrackerProcess | None) -> _StopWhenDone:
    """This process's share of the study: trials until the study holds `total` finished ones (or gives up).

    When only other workers' trials are left running, this worker waits for them instead of leaving: if one
    of them died, its retry is queued and this worker runs it.
    """
    stopper = _StopWhenDone(total, spec.search.max_consecutive_failures, progress, tracker)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        recover_dead_trials(study, tracker)
        _close_stale_runs(study, tracker, stopper.checked)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        if _committed(study) < total:
            try:
                study.optimize(objective, timeout=left, catch=(Exception,), callbacks=[stopper])
            except optuna.exceptions.UpdateFinishedTrialError as exc:
                # another worker failed this trial while it ran (it missed its heartbeats on a loaded machine);
                # the trial's retry is queued, so this worker just goes on
                logger.warning("a trial was failed by another worker while it ran: %s", exc)
                continue
            if stopper.gave_up:
                break
            continue
        if len(study.get_trials(deepcopy=False, states=FINISHED)) >= total:
            break
        time.sleep(1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # RDB heartbeat: fails (and queues again) dead workers' trials
    return stopper


def _worker_main(job: dict[str, Any]) -> None:
    """One worker process of `optimize(workers=N)`: attach to the study and run trials until it is done."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    set_thread_budget(job["threads"])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = job["study"]
    try:
        exp = prepare(spec, data=job["data"], model=job["model"], data_dir=job["data_dir"], device=job["device"],
                      plugins=job["plugins"])
        study, tracker, parent = _open_study(spec, job["study_name"], job["storage"], job["tracking"],
                                             job["tracking_uri"], create=False, salt=job["index"] + 1)
        objective = _Objective(exp, job["study_name"], tracker, parent, job["n_trials"], job["keep_dir"])
        try:
            stopper = _run_trials(study, objective, job["n_trials"], job["timeout"], spec, None, tracker)
        finally:
            if tracker is not None:
                tracker.close()
    except KeyboardInterrupt:
        sys.exit(130)
    except RegsearchError as exc:
        logger.error("worker %d: %s", os.getpid(), exc)
        sys.exit(exc.exit_code)
    sys.exit(3 if stopper.gave_up else 0)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class _Follower:
    """Shows every worker's finished trials on this process's progress bar."""

    def __init__(self, study: optuna.Study, progress: Progress | None) -> None:
        self.study = study
        self.progress = progress
        self.seen = {t.number for t in study.get_trials(deepcopy=False, states=FINISHED)}

    def start(self, study_name: str, finished: int, total: int) -> None:
        pass

    def trial_done(self, trial: optuna.trial.FrozenTrial, study: optuna.Study) -> None:
        self.scan()

    def scan(self) -> None:
        for t in self.study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in self.seen:
                self.seen.add(t.number)
                if self.progress is not None:
                    self.progress.trial_done(t, self.study)

    def close(self) -> None:
        pass


def _run_workers(study: optuna.Study, job: dict[str, Any], workers: int, progress: Progress | None,
                 run_here: Callable[[Progress], _StopWhenDone]) -> bool:
    """This process is worker 0 (already prepared, so it starts at once); start the others, run trials, wait
    for the others to end. True when the study was given up (too many failures in a row)."""
    ctx = multiprocessing.get_context("spawn")
    gpus = torch.cuda.device_count() if job["device"] in ("auto", "cuda") and torch.cuda.is_available() else 0
    jobs = [{**job, "index": i, **({"device": f"cuda:{i % gpus}"} if gpus > 1 else {})} for i in range(1, workers)]
    procs = [ctx.Process(target=_worker_main, args=(j,), name=f"regsearch-worker-{j['index']}") for j in jobs]
    for proc in procs:
        proc.start()
    follower = _Follower(study, progress)
    try:
        stopper = run_here(follower)
        while True:
            follower.scan()
            alive = [p for p in procs if p.is_alive()]
            if not alive:
                break
            alive[0].join(timeout=1.0)
    except KeyboardInterrupt:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=30)
        raise
    failed = [p.exitcode for p in procs if p.exitcode not in (0, 3)]
    if failed:
        logger.warning("%d worker process(es) ended with exit codes %s; their finished trials are kept",
                       len(failed), failed)
    return stopper.gave_up or (3 in [p.exitcode for p in procs] and _committed(study) < job["n_trials"])


def test_score(exp: Experiment, model: nn.Module, autocast: torch.dtype | None) -> tuple[float, float]:
    """(loss, accuracy) on the test split, in eval mode and in the precision the trial trained in (`autocast`):
    asked once per study for the best trial and the baseline."""
    return evaluate(model, Batcher(exp.data), exp.data.x_test, exp.data.y_test, exp.spec.training.eval_batch_size,
                    autocast)


def stored_autocast(exp: Experiment, trial: optuna.trial.FrozenTrial) -> torch.dtype | None:
    """The precision a stored trial trained in, whatever this machine or the study file would choose now (another
    worker's machine may have had bf16 arithmetic). A trial stored before precisions were recorded trained as
    regsearch did then: bfloat16 on CUDA, float32 elsewhere."""
    recorded = trial.user_attrs.get(PRECISION_ATTR)
    if recorded is None:
        return torch.bfloat16 if exp.device.type == "cuda" else None
    return PINNED[recorded]


def _rebuild(exp: Experiment, trial: optuna.trial.FrozenTrial) -> tuple[nn.Module, list[Applied], float, int]:
    """A stored trial's untrained model, regularizers, learning rate and seed, from its parameters."""
    seed = trial.user_attrs.get("seed", trial_seed(exp.spec.seed, trial.number))
    model, applied, lr = build_trial(exp, optuna.trial.FixedTrial(trial.params, number=trial.number), seed,
                                     baseline=is_baseline(trial))
    return model, applied, lr, seed


def retrain(exp: Experiment, trial: optuna.trial.FrozenTrial) -> nn.Module:
    """Train a stored trial again from its parameters and seed, in its precision (the same model on CPU)."""
    model, applied, lr, seed = _rebuild(exp, trial)
    fit(model, exp.data, applied, training_for(exp, trial), lr=lr, device=exp.device, seed=seed,
        autocast=stored_autocast(exp, trial))
    return model


def _final_report(study: optuna.Study, exp: Experiment, objective: _Objective, tracker: TrackerProcess | None,
                  parent: str | None) -> None:
    """Evaluate the best trial on the test split once and log it, with its model, on the parent run.

    The best trial is `best_trial`'s: feasible under a gap constraint, the front's best val_acc for pareto
    (whose front is logged too). With no such trial, nothing is tested or logged.
    """
    if tracker is not None and is_pareto(study):
        tracker.log_pareto_front(parent, pareto_front(study))
    best = best_trial(study)
    if best is None:
        return
    if exp.data.y_test is None:  # the user's own data without a test split: the sentence, without test accuracy
        study.set_user_attr(SUMMARY_ATTR, summary_sentence(study, exp.spec, best, None))
        return
    if tracker is not None:
        parent = tracker.parent_run_id()
    done = study.user_attrs.get(TEST_ATTR) or {}
    if done.get("trial") == best.number and done.get("mlflow_run_id") == parent:
        return  # this best trial's test score and model are already on this study run
    kept = os.path.join(objective.keep_dir, f"trial-{best.number}.pt") if objective.keep_dir else None
    if objective.best is not None and objective.best[1] == best.number:
        model = objective.best[2]
    elif kept and os.path.exists(kept):
        model = _rebuild(exp, best)[0]
        model.load_state_dict(torch.load(kept, map_location=exp.device))
    else:
        logger.info("retraining the best trial (%d) of an earlier run for the test report", best.number)
        model = retrain(exp, best)
    test_loss, test_acc = test_score(exp, model, stored_autocast(exp, best))
    result = {"trial": best.number, "test_acc": test_acc, "test_loss": test_loss, "mlflow_run_id": parent}
    study.set_user_attr(TEST_ATTR, result)
    sentence = summary_sentence(study, exp.spec, best, test_acc)
    study.set_user_attr(SUMMARY_ATTR, sentence)
    if tracker is None:
        return
    metrics = best.user_attrs.get(METRIC_ATTR, {})
    tracker.log_summary({"best_val_acc": trial_val_acc(best), "best_test_acc": test_acc, "best_test_loss": test_loss,
                         **{f"best_{k}": v for k, v in metrics.items() if k.startswith("gap")}},
                        {"best_trial": str(best.number), "regsearch.summary": sentence})
    tracker.log_model(model, exp.example[:2])


def combination(spec: StudySpec, trial: optuna.trial.FrozenTrial) -> list[str]:
    """The regularizers a trial switched on, each with its own searched values: ["l2(weight_decay=0.0004)", ...]."""
    if is_baseline(trial):
        return []
    params = trial.params
    on = []
    for r in spec.regularizers:
        if r.enabled == "off":
            continue
        if r.choice is not None and r.enabled == "search":
            picked = params.get(f"choice.{r.choice}") == r.name
        else:
            picked = r.enabled == "on" or bool(params.get(f"{r.name}.enabled"))
        if not picked:
            continue
        own = {k[len(r.name) + 1:]: v for k, v in params.items() if k.startswith(f"{r.name}.")
               and k != f"{r.name}.enabled" and not isinstance(v, bool)}
        values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(own.items()))
        on.append(f"{r.name}({values})" if values else r.name)
    return on


def summary_sentence(study: optuna.Study, spec: StudySpec, best: optuna.trial.FrozenTrial,
                     test_acc: float | None) -> str:
    """What the study found, in words: the best combination, its test accuracy and gap against the baseline."""
    metrics = best.user_attrs.get(METRIC_ATTR, {})
    found = " + ".join(combination(spec, best)) or "no regularizer"
    score = (f"test accuracy {test_acc:.3f}" if test_acc is not None
             else f"validation accuracy {metrics.get('val_acc', float('nan')):.3f}")
    gap = metrics.get("gap_acc")
    sentence = (f"Best combination (trial {best.number}): {found} - {score}"
                + (f", generalization gap {gap:.3f}" if gap is not None else ""))
    baseline = next((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                     if is_baseline(t)), None)
    if baseline is None or baseline.number == best.number:
        return sentence + ("; it is the unregularized baseline itself." if baseline is not None else ".")
    base = baseline.user_attrs.get(METRIC_ATTR, {})
    base_test = baseline.user_attrs.get(TEST_ACC_ATTR)
    parts = [f"test accuracy {base_test:.3f}" if base_test is not None and test_acc is not None
             else f"validation accuracy {base['val_acc']:.3f}" if "val_acc" in base else None,
             f"gap {base['gap_acc']:.3f}" if "gap_acc" in base else None]
    return sentence + f"; the unregularized baseline (trial {baseline.number}): " + ", ".join(
        p for p in parts if p) + "."


def leaderboard(study: optuna.Study, top: int = 5) -> list[dict[str, Any]]:
    """The best finished trials, best first: number, state, val_acc, gap_acc, train_acc, feasible, params.

    Complete trials come first, and among them the feasible ones (gap_acc within the study's max_gap);
    `feasible` is None in a study without a gap constraint.
    """
    constrained = study_max_gap(study) is not None
    rows = []
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        m = t.user_attrs.get(METRIC_ATTR, {})
        rows.append({"number": t.number, "state": t.state.name, "val_acc": trial_val_acc(t),
                     "gap_acc": trial_gap_acc(t), "train_acc": m.get("train_acc"), "epochs": t.user_attrs.get("epochs"),
                     "feasible": is_feasible(t) if constrained else None, "params": t.params,
                     "baseline": is_baseline(t)})
    rows.sort(key=lambda r: (r["state"] != "COMPLETE", r["feasible"] is False, -(r["val_acc"] or 0), r["number"]))
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
