"""Where a trial is decided: Optuna's objective builds, trains, reports, records and logs one trial."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import optuna
import torch
from torch import nn

from regsearch._device import precision_name, training_autocast
from regsearch._errors import RegsearchError
from regsearch._records import (
    FAIL_REASON_ATTR,
    FINISHED,
    GAP_CONSTRAINT,
    INTERRUPTED,
    METRIC_ATTR,
    PRECISION_ATTR,
    RUN_ID_ATTR,
    RUNNING,
    SURPLUS,
    TEST_ACC_ATTR,
    TRAIN_SECONDS_ATTR,
    WORKER_ATTR,
    curve_key,
    is_baseline,
    rank_key,
    run_status,
)
from regsearch._trainer import fit
from regsearch._trial import Experiment, build_trial, test_score, training_for, trial_seed
from regsearch.data._tensors import reshuffled

if TYPE_CHECKING:
    from regsearch.tracking import Tracking

logger = logging.getLogger("regsearch")


class Surplus(Exception):
    """A trial asked for after the study already had its total (a race between workers)."""


class _TrialRun:
    """A trial's MLflow run, through the tracker (None: no tracking); its id is stored on the trial once known."""

    def __init__(self, tracker: Tracking | None, trial: optuna.Trial, study_name: str) -> None:
        self.tracker, self.trial, self.run_id, self.run = tracker, trial, None, trial.number
        # the run spans the trial as Optuna records it, however late the tracking process makes it
        start_ms = int(trial.datetime_start.timestamp() * 1000) if trial.datetime_start else None
        if tracker:
            tracker.start_trial(trial.number, study_name, start_ms=start_ms)

    def note_run_id(self, final: bool = False) -> None:
        if self.tracker and self.run_id is None:
            self.run_id = self.tracker.run_id(self.run, final=final)
            if self.run_id:
                self.trial.set_user_attr(RUN_ID_ATTR, self.run_id)

    def params(self, params: Mapping[str, object]) -> None:
        if self.tracker:
            self.tracker.log_params(self.run, params)

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.tracker:
            self.tracker.log_epoch(self.run, epoch, metrics)
            self.note_run_id()

    def end(self, state: str, reason: str | None = None) -> None:
        if self.tracker:
            self.note_run_id(final=True)  # stored first: after the run's end, only Optuna's own record follows
            self.tracker.end_trial(self.run, *run_status(state, reason))


class Objective:
    """Optuna's objective: one call per trial, in this process, keeping this process's best model."""

    def __init__(self, exp: Experiment, study_name: str, tracker: Tracking | None, parent_run_id: str | None,
                 total: float, keep_dir: str | None = None):
        self.exp, self.study_name, self.tracker, self.parent_run_id = exp, study_name, tracker, parent_run_id
        self.total, self.keep_dir = total, keep_dir
        self.best: tuple[tuple, int, nn.Module] | None = None
        self.pareto = exp.spec.search.objective == "pareto"
        self.max_gap = exp.spec.search.max_gap

    def _rank(self, number: int, metrics: Mapping[str, float]) -> tuple:
        """`rank_key` of a trial that just completed, so that the kept model is the one `best_trial` picks."""
        feasible = None if self.max_gap is None else metrics["gap_acc"] <= self.max_gap
        return rank_key(metrics["val_acc"], metrics.get("val_loss"), feasible, number,
                        metrics["gap_acc"] if self.pareto else None)

    def _constrain(self, trial: optuna.Trial, metrics: Mapping[str, float]) -> None:
        """Record the gap constraint (feasible when <= 0), on complete and pruned trials alike: TPE uses both."""
        if self.max_gap is not None:
            trial.set_constraint(GAP_CONSTRAINT, metrics["gap_acc"] - self.max_gap)

    def _keep(self, number: int, rank: tuple, model: nn.Module) -> None:
        """Remember this process's best model (on disk too, for the main process of a multi-worker run)."""
        if self.best is not None and rank >= self.best[0]:
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
            raise Surplus(SURPLUS)
        seed = trial_seed(self.exp.spec.seed, trial.number)
        trial.set_user_attr("seed", seed)
        run = _TrialRun(self.tracker, trial, self.study_name)
        state, reason = "FAIL", None
        try:
            metrics = self._train(trial, seed, run)
            state = "COMPLETE"
            return (metrics["val_acc"], metrics["gap_acc"]) if self.pareto else metrics["val_acc"]
        except optuna.TrialPruned as exc:
            state, reason = "PRUNED", str(exc)
            raise
        except KeyboardInterrupt:
            reason = INTERRUPTED
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, RegsearchError) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            logger.warning("trial %d failed: %s", trial.number, reason)
            raise
        finally:
            run.end(state, reason)

    def _train(self, trial: optuna.Trial, seed: int, run: _TrialRun) -> dict[str, float]:
        """Build, train and record the trial; raises TrialPruned when the pruner stops it."""
        baseline = is_baseline(trial)
        data = reshuffled(self.exp.data, seed) if self.exp.spec.search.reshuffle else self.exp.data
        model, applied, lr = build_trial(self.exp, trial, seed, baseline=baseline)
        run.params({**trial.params, "seed": seed})
        training = training_for(self.exp, trial)  # with the trial's searched training keys
        autocast = training_autocast(training, self.exp.device, model, data)
        trial.set_user_attr(PRECISION_ATTR, precision_name(autocast))
        run.params({PRECISION_ATTR: precision_name(autocast)})
        epochs: list[int] = []
        started = time.perf_counter()
        try:
            metrics = fit(model, data, applied, training, lr=lr, device=self.exp.device,
                          seed=seed, on_epoch=lambda epoch, m: self._on_epoch(trial, run, epochs, epoch, m),
                          autocast=autocast)
        finally:  # the trainer's own time (its per-epoch evaluation included), beside the trial's wall time
            trial.set_user_attr(TRAIN_SECONDS_ATTR, round(time.perf_counter() - started, 3))
        trial.set_user_attr(METRIC_ATTR, metrics)
        if baseline and self.exp.data.y_test is not None:  # what the final summary compares against
            trial.set_user_attr(TEST_ACC_ATTR, test_score(self.exp, model, autocast)[1])
        trial.set_user_attr("epochs", len(epochs))  # fewer than training.epochs when a plugin stopped early
        self._constrain(trial, metrics)
        self._keep(trial.number, self._rank(trial.number, metrics), model)
        return metrics

    def _on_epoch(self, trial: optuna.Trial, run: _TrialRun, epochs: list[int], epoch: int,
                  metrics: dict[str, float]) -> None:
        epochs.append(epoch)
        # one record per epoch, written once: a killed trial keeps the epochs it finished
        trial.set_user_attr(curve_key(epoch), {k: round(v, 6) for k, v in metrics.items()})
        run.epoch(epoch, metrics)
        if self.pareto:
            return  # multi-objective trials take no intermediate values (and are never pruned)
        trial.report(metrics["val_acc"], epoch)
        if trial.should_prune():
            trial.set_user_attr(METRIC_ATTR, metrics)
            trial.set_user_attr("epochs", epoch)
            self._constrain(trial, metrics)
            raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_acc {metrics['val_acc']:.4f})")
