"""Logging a study's trials to MLflow from the Optuna storage, for the runs an unreachable tracking store missed.

The Optuna storage is the source of truth. Each finished trial should have one child run under the study's
parent run (matched by its `trial_number` tag). A trial that finished while the store was down has none: it
gets one, rebuilt from the storage (parameters, the per-epoch `val_acc` Optuna saw, the final metrics, its real
end state) and tagged `regsearch.synced=true`. A trial whose run was cut off midway keeps what was logged, but
its run is ended with the trial's state (tag `regsearch.synced=ended`) instead of staying RUNNING. Running it
again adds nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from filelock import FileLock, Timeout
from sqlalchemy.engine import make_url

from regsearch._records import METRIC_ATTR, PRECISION_ATTR, is_surplus, run_outcome, trial_curve
from regsearch._storage import DEFAULT_STORAGE, sqlite_path, storage_identity
from regsearch.tracking._batches import log_batches

if TYPE_CHECKING:
    from mlflow.entities import Metric, Run

    from regsearch.tracking._client import Tracker

SYNCED_TAG = "regsearch.synced"


@dataclass
class SyncReport:
    """What one sync did: trials given a run, trials whose RUNNING run was ended, trials already logged."""

    logged: list[int] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)
    present: int = 0
    busy: bool = False
    """Another process was syncing the same study to the same store, so this one did nothing."""

    def describe(self) -> str:
        if self.busy:
            return "another process is logging this study's missing runs; nothing done"
        return (f"logged {_runs(self.logged)} from the Optuna storage{_numbers(self.logged)}, ended "
                f"{_runs(self.ended)} left RUNNING{_numbers(self.ended)}, {self.present} already there")


def _runs(numbers: list[int]) -> str:
    return f"{len(numbers)} run{'' if len(numbers) == 1 else 's'}"


def _numbers(numbers: list[int]) -> str:
    if not numbers:
        return ""
    shown = ", ".join(str(n) for n in numbers[:10])
    return f" (trial{'' if len(numbers) == 1 else 's'} {shown}{', ...' if len(numbers) > 10 else ''})"


def _ms(when: datetime | None) -> int | None:
    return int(when.timestamp() * 1000) if when is not None else None


def _trial_metrics(trial: optuna.trial.FrozenTrial) -> list[Metric]:
    """Per-epoch `val_acc` (Optuna's intermediate values) and the final metrics at the last epoch reached."""
    from mlflow.entities import Metric

    start = _ms(trial.datetime_start) or _ms(trial.datetime_complete) or int(time.time() * 1000)
    end = _ms(trial.datetime_complete) or start
    # a multi-objective (pareto) trial reports no intermediate values: its stored curve has them
    per_epoch = dict(trial.intermediate_values) or {
        row["epoch"]: row["val_acc"] for row in trial_curve(trial) if "val_acc" in row}
    steps = sorted(per_epoch)
    last = trial.user_attrs.get("epochs") or (steps[-1] if steps else 0)
    # Optuna keeps no time per epoch: spread the epochs evenly over the trial's duration
    at = {s: start + (end - start) * s // max(last, steps[-1] if steps else 1, 1) for s in steps}
    metrics = [Metric("val_acc", float(v), at[s], s) for s, v in sorted(per_epoch.items())]
    for key, value in (trial.user_attrs.get(METRIC_ATTR) or {}).items():
        if key == "val_acc" and last in per_epoch:
            continue  # already there, per epoch
        with contextlib.suppress(TypeError, ValueError):
            metrics.append(Metric(key, float(value), end, int(last)))
    return metrics


def _trial_runs(tracker: Tracker, parent_run_id: str) -> dict[int, list[Run]]:
    """The parent run's child runs by trial number (deleted ones too: a user's deletion is respected)."""
    from mlflow.entities import ViewType

    runs: dict[int, list[Run]] = {}
    token = None
    while True:
        page = tracker.client.search_runs([tracker.experiment_id],
                                          filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                          run_view_type=ViewType.ALL, max_results=50_000, page_token=token)
        for run in page:
            number = run.data.tags.get("trial_number", "")
            if number.isdigit():
                runs.setdefault(int(number), []).append(run)
        token = page.token
        if not token:
            return runs


def _plan(study: optuna.Study, runs: dict[int, list[Run]], skip: Collection[int] = ()
          ) -> tuple[list[optuna.trial.FrozenTrial], list[tuple[optuna.trial.FrozenTrial, list[Run]]], int]:
    """(trials without a run, (trial, its RUNNING runs) to end, trials already logged)."""
    missing: list[optuna.trial.FrozenTrial] = []
    dangling: list[tuple[optuna.trial.FrozenTrial, list[Run]]] = []
    present = 0
    for trial in study.get_trials(deepcopy=False):
        if not trial.state.is_finished() or trial.number in skip:
            continue
        if is_surplus(trial):
            continue  # a trial asked for after the study had its total: never trained, never logged
        found = runs.get(trial.number)
        if not found:
            missing.append(trial)
            continue
        running = [r for r in found if r.info.status == "RUNNING" and r.info.lifecycle_stage == "active"]
        if running:
            dangling.append((trial, running))
        else:
            present += 1
    return missing, dangling, present


@contextlib.contextmanager
def sync_lock(storage: str | None, key: str) -> Iterator[bool]:
    """True when this process may sync the study `key` now, False while another one does; nothing is written to
    the storage, and a process killed while it holds the lock holds it no more.

    PostgreSQL: an advisory lock on a connection of its own (the server releases it when the connection dies). A
    journal or SQLite file: a file lock beside it. Another database: a file lock in this machine's temporary folder.
    """
    url = storage or DEFAULT_STORAGE
    digest = hashlib.sha1(key.encode()).digest()
    if "://" in url and make_url(url).get_backend_name() in ("postgresql", "postgres"):
        with _advisory_lock(url, int.from_bytes(digest[:8], "big", signed=True)) as mine:
            yield mine
        return
    path = (Path(url) if "://" not in url else sqlite_path(url) if make_url(url).get_backend_name() == "sqlite"
            else None)
    if path is None:
        path = Path(tempfile.gettempdir()) / hashlib.sha1(storage_identity(url).encode()).hexdigest()[:16]
    lock = FileLock(f"{path}.sync-{digest.hex()[:10]}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


@contextlib.contextmanager
def _advisory_lock(url: str, key: int) -> Iterator[bool]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            mine = bool(conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
            try:
                yield mine
            finally:
                if mine:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def sync_runs(study: optuna.Study, tracker: Tracker, parent_run_id: str, skip: Collection[int] = (), *,
              log_missing: bool = True) -> SyncReport:
    """Give every finished trial of `study` its child run under `parent_run_id`; raises when the store fails.

    `skip`: trials whose runs the caller is still logging (their last records may not be sent yet). Without
    `log_missing`, only the runs left RUNNING are ended (a store short of space may take that, not new runs).
    """
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED,
                                                        optuna.trial.TrialState.FAIL))
    if not finished:
        return SyncReport()
    missing, dangling, present = _plan(study, _trial_runs(tracker, parent_run_id), skip)
    if not dangling and not (missing and log_missing):
        return SyncReport(present=present)
    key = f"{storage_identity(tracker.storage)}|{study.study_name}|{tracker.uri}|{tracker.experiment_id}"
    with sync_lock(tracker.storage, key) as mine:
        if not mine:
            return SyncReport(present=present, busy=True)
        # what another process synced while this one waited for the lock is not done twice
        missing, dangling, present = _plan(study, _trial_runs(tracker, parent_run_id), skip)
        report = SyncReport(present=present)
        for trial in missing if log_missing else ():
            _log_trial(tracker, trial, parent_run_id, study.study_name)
            report.logged.append(trial.number)
        for trial, runs in dangling:
            status, tags = run_outcome(trial)
            for run in runs:
                log_batches(tracker.client, run.info.run_id, tags={**tags, SYNCED_TAG: "ended"})
                tracker.client.set_terminated(run.info.run_id, status=status,
                                              end_time=_ms(trial.datetime_complete))
            report.ended.append(trial.number)
        return report


def _log_trial(tracker: Tracker, trial: optuna.trial.FrozenTrial, parent_run_id: str, study_name: str) -> None:
    status, tags = run_outcome(trial)
    run = tracker.client.create_run(
        tracker.experiment_id, start_time=_ms(trial.datetime_start) or _ms(trial.datetime_complete),
        run_name=f"trial-{trial.number}",
        tags={"mlflow.parentRunId": parent_run_id, "trial_number": str(trial.number),
              "regsearch.study": study_name, **tags, SYNCED_TAG: "true"})
    run_id = run.info.run_id
    params = dict(trial.params)
    params.update({key: trial.user_attrs[key] for key in ("seed", PRECISION_ATTR) if key in trial.user_attrs})
    log_batches(tracker.client, run_id, params=params, metrics=_trial_metrics(trial))
    tracker.client.set_terminated(run_id, status=status, end_time=_ms(trial.datetime_complete))


def unlogged(study: optuna.Study, tracker: Tracker, parent_run_id: str, skip: Collection[int] = ()) -> int:
    """How many finished trials have no run, or one left RUNNING; raises when the store fails."""
    missing, dangling, _ = _plan(study, _trial_runs(tracker, parent_run_id), skip)
    return len(missing) + len(dangling)
