"""Dead workers: their RUNNING trials are failed and queued again, and their MLflow runs are ended."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import optuna
import psutil
from filelock import FileLock

from regsearch import _thirdparty
from regsearch._records import FAIL, FAIL_REASON_ATTR, RUN_ID_ATTR, RUNNING, WORKER_ATTR, run_status

if TYPE_CHECKING:
    from regsearch.tracking import Tracking

logger = logging.getLogger("regsearch")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs; a killed process its parent has not reaped yet (a zombie) is dead."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # not ours to look at: it exists
        return True


def recover_dead_trials(study: optuna.Study, tracker: Tracking | None, max_retry: int = 3) -> list[int]:
    """Fail the RUNNING trials whose worker process on this host is gone, and queue each again once.

    Optuna's journal storage has no heartbeat, so a killed worker's trial would stay RUNNING forever; RDB
    storages also have Optuna's heartbeat, which catches workers on other machines.
    """
    host, me = socket.gethostname(), os.getpid()
    dead = [t for t in study.get_trials(deepcopy=False, states=(RUNNING,))
            if (w := t.user_attrs.get(WORKER_ATTR) or {}).get("host") == host and w.get("pid") not in (None, me)
            and not pid_alive(w["pid"])]
    if not dead:
        return []
    with _recovery_lock(study):
        return _fail_and_retry(study, tracker, [t.number for t in dead], max_retry)


@contextlib.contextmanager
def _recovery_lock(study: optuna.Study) -> Iterator[None]:
    """Serialise recovery between the processes sharing a journal file.

    A journal storage takes a second process's FAIL of a trial another process already failed (each appends to
    the log from its own view), so both would queue a retry; under this lock, with the view read afresh, only the
    first does. RDB storages refuse the second FAIL themselves.
    """
    path = _thirdparty.journal_file(_thirdparty.study_storage(study))
    if path is None:
        yield
        return
    with FileLock(f"{path}.recover.lock"):
        yield


def _fail_and_retry(study: optuna.Study, tracker: Tracking | None, numbers: list[int], max_retry: int) -> list[int]:
    recovered = []
    storage = _thirdparty.study_storage(study)
    for t in study.get_trials(deepcopy=False):  # read afresh: another process may have recovered them meanwhile
        if t.number not in numbers or t.state != RUNNING:
            continue
        worker = t.user_attrs.get(WORKER_ATTR) or {}
        try:
            if not storage.set_trial_state_values(_thirdparty.trial_id(t), state=FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        recovered.append(t.number)
        logger.warning("trial %d: its worker (pid %s) died; the trial is failed and queued again", t.number,
                       worker["pid"])
        if tracker is not None:
            tracker.end_dead_trial(t.user_attrs.get(RUN_ID_ATTR), t.number,
                                   *run_status("FAIL", f"worker pid {worker['pid']} died", killed=True))
        # the same retry Optuna's heartbeat applies on RDB storages: a WAITING copy with the same parameters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        retry(study, storage.get_trial(_thirdparty.trial_id(t)))
    return recovered


def close_stale_runs(study: optuna.Study, tracker: Tracking | None, checked: set[int]) -> None:
    """End the MLflow runs of trials that Optuna's heartbeat failed (they died without closing their run)."""
    if tracker is None:
        return
    for t in study.get_trials(deepcopy=False, states=(FAIL,)):
        if FAIL_REASON_ATTR not in t.user_attrs and t.number not in checked:
            checked.add(t.number)
            tracker.end_dead_trial(t.user_attrs.get(RUN_ID_ATTR), t.number,
                                   *run_status("FAIL", "worker stopped beating", killed=True))


def fail_stale_trials(study: optuna.Study) -> None:
    """RDB heartbeat: fail (and queue again) the trials of workers that stopped beating."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
