"""A study's runs in one MLflow tracking store, with outages handled: logging pauses, then catches up."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from regsearch._storage import mask_url
from regsearch.tracking._batches import MAX_METRICS_PER_CALL, log_batches
from regsearch.tracking._parent import agree_on_parent, experiment_id, stored_parent, study_key
from regsearch.tracking._store import check_tracking_uri, error_gist, is_full, is_outage, open_client

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from regsearch.tracking._sync import SyncReport

_Deferred = tuple[str, Callable[..., object], tuple, dict]

logger = logging.getLogger("regsearch")


_MAX_PENDING_METRICS = 200_000
"""At most this many metric values wait for an unreachable store (the oldest are dropped beyond)."""


_PROBE_SECONDS = 5.0
"""How often the background thread asks an unreachable tracking store whether it is back."""


class Tracker:
    """Logs a study's runs to one MLflow tracking store.

    Every call to the store goes through `_call`: the first failure of the store itself (unreachable, 5xx after
    MLflow's retries) marks it down, and from then on calls are skipped, not retried, until the background
    thread's probe gets an answer. A dead server so costs training one failed call (about 5 s with the
    settings below), not a failed call per logged value. Once the store answers again, the finished trials
    without a run are logged from the Optuna storage; the same happens when the parent run is opened (a study
    run) and when the tracker closes after an outage.
    """

    def __init__(self, tracking_uri: str, client: MlflowClient, experiment_id: str, flush_interval: float = 2.0
                 ) -> None:
        self.uri = tracking_uri
        self.client = client
        self.experiment_id = experiment_id
        self._pending: list[tuple[str, Metric]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._warned: set[str] = set()
        self._interval = flush_interval
        self._down = False
        self._next_probe = 0.0
        self._unsynced = False  # a call failed since the last sync: some trial may lack its run or its end
        self._outages = 0
        self._recovering = False  # a probe got an answer and sends what waited: a failure now is the same outage
        self._study: optuna.Study | None = None  # set by parent_run(): the study whose runs this tracker syncs
        self.storage: str | None = None  # that study's storage URL, as this process was given it
        self._parent: str | None = None
        self.live: Mapping[int, str | None] = {}
        """Trials whose runs are being logged (by number): a sync leaves them alone, their end may be queued."""
        self._sync_lock = threading.Lock()
        self._deferred: list[_Deferred] = []
        self._thread = threading.Thread(target=self._loop, name="regsearch-mlflow", daemon=True)
        self._mlflow_async = os.environ.get("MLFLOW_ENABLE_ASYNC_LOGGING", "").strip().lower() in ("1", "true")

    @classmethod
    def open(cls, tracking_uri: str, experiment: str, flush_interval: float = 2.0) -> Tracker:
        """A tracker on the store at `tracking_uri` (created or migrated once), its experiment, its sender running."""
        # A dead tracking server must not stall training for minutes (MLflow's defaults: 7 retries, 120 s each;
        # these give about 5 s for a refused connection, about 35 s for a server that accepts and hangs).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        check_tracking_uri(tracking_uri)
        client = open_client(tracking_uri)
        tracker = cls(tracking_uri, client, experiment_id(client, experiment), flush_interval)
        tracker._thread.start()
        return tracker

    def warn(self, what: str, exc: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning("MLflow (%s): %s failed, training goes on: %s", mask_url(self.uri), what, error_gist(exc))

    def _call(self, what: str, fn: Callable[..., object], *args: object, **kwargs: object) -> object:
        """`fn(*args, **kwargs)` on the store; None when it fails (a warning) or the store is down (skipped)."""
        if self._down:
            self._unsynced = True
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self._failed(what, exc)
            return None

    def _failed(self, what: str, exc: BaseException) -> None:
        self._unsynced = True
        if not is_outage(exc):
            self.warn(what, exc)
            return
        if not self._down:
            self._down = True
            self._next_probe = time.monotonic() + _PROBE_SECONDS
            if self._recovering:
                return
            self._outages += 1
            if is_full(exc):
                # a full disk does not empty itself, and probing it would log a little, fail again and repeat the
                # warning: the tracker tries again only as it closes
                self._next_probe = float("inf")
                logger.warning("MLflow (%s): no space left on the disk holding the tracking store (%s failed); "
                               "training goes on, and the trials it misses are counted at the end",
                               mask_url(self.uri), what)
                return
            logger.warning("MLflow (%s) does not answer (%s failed: %s); training goes on, and the trials that "
                           "finish meanwhile are logged once it is back (or by `regsearch sync`)",
                           mask_url(self.uri), what, error_gist(exc))

    def _probe(self) -> bool:
        """Ask a store marked down whether it answers again; if it does, send what waited and sync.

        Returns whether it answered. It is back only once it takes what waited too: a store on a full disk answers
        reads and refuses writes, and saying "back" and "does not answer" at each probe would only repeat itself.
        """
        self._next_probe = time.monotonic() + _PROBE_SECONDS
        try:
            self.client.get_experiment(self.experiment_id)
        except Exception:
            return False
        self._down, self._recovering = False, True
        try:
            self.flush()
            self.sync()
            self._replay()
        finally:
            self._recovering = False
        if not self._down:
            self._warned.clear()
            logger.warning("MLflow (%s) is back; the trials that finished meanwhile are logged", mask_url(self.uri))
        return True

    # --- runs --------------------------------------------------------------------------------------------

    def parent_run(self, study: optuna.Study, run_name: str, params: Mapping[str, object], *, sync: bool = True,
                   storage: str | None = None, reopen: bool = True) -> str:
        """The study's parent run, created once and remembered in the study's user attributes.

        Processes started at the same moment on several machines agree on one parent run (`agree_on_parent`);
        `storage` is the study's storage URL as this process was given it. With `sync`, the finished trials that
        have no run yet (the store was unreachable when they ran) are logged now, and again whenever the store
        comes back.
        """
        run = stored_parent(self.client, self.experiment_id, study)
        if run is None:
            run_id = agree_on_parent(self.client, self.experiment_id, study, run_name, study_key(storage, study),
                                     lambda run_id: self._log_now(run_id, params=params))
        else:
            run_id = run.info.run_id
            if reopen and run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        self._study, self._parent, self.storage = study, run_id, storage
        if sync:
            self.sync()
        return run_id

    def find_parent(self, study: optuna.Study) -> str | None:
        """The id of the study's parent run in this experiment, if the study has one that is not deleted."""
        run = stored_parent(self.client, self.experiment_id, study)
        return run.info.run_id if run is not None else None

    def sync(self) -> SyncReport | None:
        """Log the study's finished trials that lack a run, end their runs left RUNNING; a warning on failure.

        Returns the `SyncReport`, or None when there was nothing to sync with or the store did not answer.
        """
        if self._study is None or self._down:
            return None
        from regsearch.tracking._sync import sync_runs

        with self._sync_lock:
            self._unsynced = False
            try:
                # the live view, not a copy: a trial whose run starts while the sync runs is left to its own end
                report = sync_runs(self._study, self, self._parent, skip=self.live.keys())
            except Exception as exc:
                self._failed("logging the missing trial runs", exc)
                return None
        if report.logged or report.ended:
            logger.info("MLflow (%s): %s", mask_url(self.uri), report.describe())
        return report

    def start_trial(self, parent_run_id: str, number: int, study_name: str, *,
                    start_ms: int | None = None) -> str | None:
        """Make trial `number`'s run, started at `start_ms` (the trial's start; else now)."""
        run = self._call("creating a trial run", self.client.create_run, self.experiment_id, start_time=start_ms,
                         run_name=f"trial-{number}", tags={
                             "mlflow.parentRunId": parent_run_id, "trial_number": str(number),
                             "regsearch.study": study_name, "regsearch.state": "RUNNING"})
        return run.info.run_id if run is not None else None

    def log_params(self, run_id: str | None, params: Mapping[str, object]) -> None:
        """Log a trial's parameters; if the store is down, once it is back (a run cut off keeps them)."""
        if run_id is not None:
            self.now_or_later("logging parameters", log_batches, self.client, run_id, params=params)

    def log_epoch(self, run_id: str | None, step: int, metrics: Mapping[str, float], *,
                  at_ms: int | None = None) -> None:
        """Queue one epoch's metrics (measured at `at_ms`, else now); the background thread sends them in batches."""
        if run_id is None:
            return
        from mlflow.entities import Metric

        now = at_ms if at_ms is not None else int(time.time() * 1000)
        if self._mlflow_async:  # MLflow's own queue instead of this one (measured in benchmarks/tracking_overhead.py)
            self._call("logging metrics", self.client.log_batch, run_id, synchronous=False,
                       metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
            return
        with self._lock:
            self._pending.extend((run_id, Metric(k, float(v), now, step)) for k, v in metrics.items())
            if len(self._pending) > _MAX_PENDING_METRICS:  # the store has been down for a long time
                del self._pending[:len(self._pending) - _MAX_PENDING_METRICS]
        if len(self._pending) >= MAX_METRICS_PER_CALL:
            self._wake.set()

    def end_trial(self, run_id: str | None, status: str, tags: Mapping[str, str], *,
                  end_ms: int | None = None) -> None:
        """End a trial's run with `status` at `end_ms` (the trial's end; else now)."""
        if run_id is None:
            return
        self.flush()
        self._log_now(run_id, tags=tags)
        self._call("ending a trial run", self.client.set_terminated, run_id, status=status, end_time=end_ms)

    def end_dead_trial(self, run_id: str | None, number: int, status: str, tags: Mapping[str, str]) -> None:
        """End the run of a trial whose process died with `status` and `tags`, unless it already has them; found by
        its trial number without an id."""
        if run_id is None and self._parent is not None:
            found = self._call("finding a trial run", self.client.search_runs, [self.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{self._parent}' and "
                                             f"tags.trial_number = '{number}'", max_results=5)
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            return
        run = self._call("reading a trial run", self.client.get_run, run_id)
        # also a run its worker ended just before it died (before Optuna heard of the trial's end): the storage
        # says the trial died, so its run says so too
        if run is not None and (run.info.status, run.data.tags.get("regsearch.state")) != (
                status, tags.get("regsearch.state")):
            self.end_trial(run_id, status, tags)

    def now_or_later(self, what: str, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Call `fn` on the store now or, while it is down, once it answers again.

        For records nothing else holds: the study run's (summary, best model, end state) and the parameters of a
        trial run that exists (a trial without a run gets one, parameters included, from the Optuna storage).
        """
        if not self._down:
            try:
                fn(*args, **kwargs)
                return
            except Exception as exc:
                self._failed(what, exc)
                if not self._down:
                    return  # refused, not unreachable: retrying would not help
        with self._lock:
            self._deferred.append((what, fn, args, kwargs))

    def _replay(self) -> None:
        while not self._down:
            with self._lock:
                if not self._deferred:
                    return
                what, fn, args, kwargs = self._deferred.pop(0)
            self.now_or_later(what, fn, *args, **kwargs)

    # --- batching ----------------------------------------------------------------------------------------

    def _log_now(self, run_id: str, params: Mapping[str, object] | None = None, metrics: list[Metric] | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        self._call("logging", log_batches, self.client, run_id, params=params, metrics=metrics, tags=tags)

    def flush(self) -> None:
        """Send every queued metric now (kept queued while the store is down)."""
        if self._down:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        by_run: dict[str, list] = {}
        for run_id, metric in pending:
            by_run.setdefault(run_id, []).append(metric)
        for run_id, metrics in by_run.items():
            for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
                self._call("logging metrics", self.client.log_batch, run_id,
                           metrics=metrics[i:i + MAX_METRICS_PER_CALL])

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval)
            self._wake.clear()
            if not self._down:
                self.flush()
            elif time.monotonic() >= self._next_probe:
                self._probe()

    def close(self) -> int | None:
        """Send what is queued; after an outage, log the trials that finished without a run (if it answers).

        Returns how many of the study's finished trials have no run or one left RUNNING (None: it does not answer).
        """
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
        if self._mlflow_async:
            import mlflow

            self._call("logging metrics", mlflow.flush_async_logging)
        if self._down and not self._probe():
            logger.warning("MLflow (%s) still does not answer: the trials finished during the outage have no run "
                           "(%d metric values and %d other records not sent); `regsearch sync` logs them from "
                           "the Optuna storage once it is back", mask_url(self.uri), len(self._pending),
                           len(self._deferred))
            return None
        if not self._down:
            self.flush()
            if self._unsynced or self._outages:  # a trial started during an outage may have finished since
                self.sync()
            self._replay()
        if self._down:
            self._end_runs()
        return self.missing_runs() if self._unsynced or self._down else 0

    def _end_runs(self) -> None:
        """Try once to end the runs left RUNNING (the study run too) on a store that answers but refused what
        waited (a full disk): it may still take such small updates, not whole new runs."""
        from regsearch.tracking._sync import sync_runs

        if self._study is not None and self._parent is not None:
            with contextlib.suppress(Exception):
                sync_runs(self._study, self, self._parent, skip=self.live.keys(), log_missing=False)
        for _what, fn, args, kwargs in self._deferred:
            with contextlib.suppress(Exception):
                fn(*args, **kwargs)

    def missing_runs(self) -> int | None:
        """How many of the study's finished trials have no run or one left RUNNING; None when the store cannot tell."""
        if self._study is None or self._parent is None:
            return None
        from regsearch.tracking._sync import unlogged

        try:
            return unlogged(self._study, self, self._parent, set(self.live))
        except Exception:
            return None
