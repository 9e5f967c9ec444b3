"""Running a study's trials: this process's share, and worker processes on this machine that share the study."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import optuna
import torch

from regsearch._errors import RegsearchError
from regsearch._experiment import prepare
from regsearch._objective import Objective
from regsearch._records import FAIL, FAIL_REASON_ATTR, FINISHED, RUNNING, SURPLUS
from regsearch._recovery import close_stale_runs, fail_stale_trials, recover_dead_trials
from regsearch._session import Stores, attach
from regsearch._spec import StudySpec
from regsearch._threads import set_thread_budget

if TYPE_CHECKING:
    from regsearch.tracking import Tracking

logger = logging.getLogger("regsearch")


class Progress(Protocol):
    """What a front end (the CLI's progress bar) is told while a study runs."""

    def start(self, study_name: str, finished: int, total: float) -> None: ...

    def trial_done(self, trial: optuna.trial.FrozenTrial, study: optuna.Study) -> None: ...

    def close(self) -> None: ...


def committed(study: optuna.Study) -> int:
    """Trials finished or running: a worker starts no trial that a running one will complete."""
    return len(study.get_trials(deepcopy=False, states=(*FINISHED, RUNNING)))


class StopWhenDone:
    """Stops this worker once finished + running trials reach `total`, or after too many failures in a row.

    After each trial it also fails the trials of workers on this host that died, and queues them again.
    """

    def __init__(self, total: float, max_failures: int, progress: Progress | None, tracker: Tracking | None):
        self.total, self.max_failures, self.progress, self.tracker = total, max_failures, progress, tracker
        self.failures: list[str] = []
        self.gave_up = False
        self.checked: set[int] = set()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.progress is not None:
            self.progress.trial_done(trial, study)
        reason = trial.user_attrs.get(FAIL_REASON_ATTR, "unknown")
        if trial.state == FAIL and reason != SURPLUS:
            self.failures.append(reason)
        elif trial.state != FAIL:
            self.failures.clear()
        recover_dead_trials(study, self.tracker)
        close_stale_runs(study, self.tracker, self.checked)
        if len(self.failures) >= self.max_failures:
            self.gave_up = True
            study.stop()
        elif reason == SURPLUS or committed(study) >= self.total:
            study.stop()


def run_trials(study: optuna.Study, objective: Objective, total: float, timeout: float | None,
               progress: Progress | None) -> StopWhenDone:
    """This process's share of the study: trials until the study holds `total` finished ones (or gives up).

    When only other workers' trials are left running, this worker waits for them instead of leaving: if one
    of them died, its retry is queued and this worker runs it.
    """
    tracker = objective.tracker
    stopper = StopWhenDone(total, objective.exp.spec.search.max_consecutive_failures, progress, tracker)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        recover_dead_trials(study, tracker)
        close_stale_runs(study, tracker, stopper.checked)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        if committed(study) < total:
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
        fail_stale_trials(study)
    return stopper


@dataclass(frozen=True)
class Job:
    """What a worker process needs to join a study (picklable: it crosses to a spawned process)."""

    spec: StudySpec
    name: str
    total: float
    """finished trials to reach; math.inf when only the timeout bounds the study"""
    timeout: float | None
    stores: Stores
    inputs: dict[str, Any] = field(default_factory=dict)
    """`prepare`'s keyword arguments: data, model, data_dir, device, plugins."""
    keep_dir: str | None = None
    threads: int = 1
    index: int = 0


def worker_main(job: Job) -> None:
    """One worker process of `optimize(workers=N)`: attach to the study and run trials until it is done."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    set_thread_budget(job.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        exp = prepare(job.spec, **job.inputs)
        study, tracker = attach(exp.spec, job.name, job.stores, create=False, salt=job.index + 1)
        objective = Objective(exp, job.name, tracker, None, job.total, job.keep_dir)
        try:
            stopper = run_trials(study, objective, job.total, job.timeout, None)
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

    def start(self, study_name: str, finished: int, total: float) -> None:
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


def run_workers(study: optuna.Study, job: Job, workers: int, progress: Progress | None,
                run_here: Callable[[Progress], StopWhenDone]) -> bool:
    """This process is worker 0 (already prepared, so it starts at once); start the others, run trials, wait
    for the others to end. True when the study was given up (too many failures in a row)."""
    ctx = multiprocessing.get_context("spawn")
    device = job.inputs.get("device", "auto")
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") and torch.cuda.is_available() else 0
    jobs = [replace(job, index=i, inputs={**job.inputs, **({"device": f"cuda:{i % gpus}"} if gpus > 1 else {})})
            for i in range(1, workers)]
    procs = [ctx.Process(target=worker_main, args=(j,), name=f"regsearch-worker-{j.index}") for j in jobs]
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
    return stopper.gave_up or (3 in [p.exitcode for p in procs] and committed(study) < job.total)
