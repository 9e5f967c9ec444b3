"""MLflow tracking: an experiment per study, one parent run shared by all workers, a child run per trial.

A study talks to MLflow through `TrackerProcess`: the `Tracker` runs in a child process, so importing MLflow,
creating (migrating) a new store, every call to the store and logging the best model run on another core
while this process prepares data and trains, instead of adding to the study's time (threads would not do:
MLflow's work is Python that holds the GIL the training loop needs). Per-epoch metrics are buffered and sent
in batches from a background thread, so that logging never waits on the tracking store.

A tracking failure is a warning, never a crashed study: when the store stops answering, logging pauses (a
background probe asks again every few seconds) and the trials finished meanwhile are logged from the Optuna
storage once it answers (`regsearch._sync`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from regsearch._errors import StorageError
from regsearch._storage import mask_url

logger = logging.getLogger("regsearch")

PARENT_RUN_ATTR = "mlflow_parent_run_id"
_MAX_PARAMS_PER_CALL = 100
_MAX_METRICS_PER_CALL = 1000
_MAX_PENDING_METRICS = 200_000
"""At most this many metric values wait for an unreachable store (the oldest are dropped beyond)."""
_PROBE_SECONDS = 5.0
"""How often the background thread asks an unreachable tracking store whether it is back."""
_MIN_FREE_BYTES = 1 << 20
"""A local store on a disk with less free space than this is refused before training (it would fail midway)."""


def default_tracking_uri() -> str:
    """MLflow's own default, made explicit: `mlflow.db` in the current folder (found by a plain `mlflow ui`)."""
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def local_store_problem(path: str | os.PathLike[str], *, folder: bool = False) -> str | None:
    """Why a local store cannot be written at `path` (a file; a folder when `folder`), or None when it can.

    Checked before any training: a missing or read-only folder, a path that is not a regular file (`/dev/full`
    reads as endless zeros and takes every write as "disk full"; `/dev/null` keeps nothing), a full disk.
    """
    path = Path(path).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists():
        if folder and not path.is_dir():
            return f"{path} is not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder, not a file"
        if not folder and not path.is_file():
            return f"{path} is not a regular file"
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            return f"cannot write to {path}"
    if not parent.is_dir():
        return f"folder {parent} does not exist"
    # a new file, or the journal files SQLite writes next to its database, need a writable folder
    where = path if folder and path.exists() else parent
    if not os.access(where, os.W_OK | os.X_OK):
        return f"cannot write to folder {where}"
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    if free < _MIN_FREE_BYTES:
        return f"no space left on the disk holding {where} ({free // 1024} KiB free)"
    return None


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (relative with three slashes, absolute with four); None in memory."""
    rest = url.split(":", 1)[1].split("?", 1)[0]
    path = rest[len("//"):].lstrip("/")
    if not path or path == ":memory:":
        return None
    return Path("/" + path if rest.startswith("////") else path)


def _local_tracking_path(uri: str) -> tuple[Path, bool] | None:
    """(path, is a folder store) of a local tracking URI; None for a remote or in-memory store."""
    if uri.split(":", 1)[0].lower() in ("databricks", "databricks-uc", "uc"):
        return None
    if "://" not in uri and not uri.startswith("file:"):
        return Path(uri), True  # a plain path is MLflow's file store
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        path = sqlite_path(uri)
        return (path, False) if path is not None else None
    if scheme == "file":
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path)), True
    return None


def check_tracking_uri(uri: str) -> None:
    """Raise StorageError when a local tracking store (sqlite:///FILE, file:///DIR, a path) cannot be used.

    Without this MLflow retries a read-only SQLite file for about two minutes, creates missing folders for a
    mistyped path, and refuses its file store with a paragraph.
    """
    local = _local_tracking_path(uri)
    if local is None:
        return
    path, folder = local
    problem = local_store_problem(path, folder=folder)
    if problem:
        raise StorageError(problem)
    if folder and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        raise StorageError("MLflow 3 takes a file store only with MLFLOW_ALLOW_FILE_STORE=true; use a database "
                           f"such as sqlite:///{path.parent / 'mlflow.db'}")


def param_entities(params: Mapping[str, Any]) -> list:
    """MLflow `Param`s: values as text, passwords masked, cut at MLflow's length limit."""
    from mlflow.entities import Param

    return [Param(k, mask_url(str(v))[:6000]) for k, v in params.items()]


def log_batches(client: Any, run_id: str, *, params: Mapping[str, Any] | None = None, metrics: list | None = None,
                tags: Mapping[str, str] | None = None) -> None:
    """Log to one run in as few calls as MLflow's per-call limits allow; raises when the store fails."""
    from mlflow.entities import RunTag

    items = param_entities(params or {})
    for i in range(0, len(items), _MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=items[i:i + _MAX_PARAMS_PER_CALL])
    metrics = metrics or []
    tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, max(len(metrics), 1 if tag_items else 0), _MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=metrics[i:i + _MAX_METRICS_PER_CALL], tags=tag_items if i == 0 else [])


def _is_outage(exc: BaseException) -> bool:
    """A failure of the store itself (unreachable, 5xx after retries), not a request it refused (4xx) or a bug."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, OSError)  # connection errors and timeouts (requests' exceptions are OSErrors)


class Tracker:
    """Logs a study's runs to one MLflow tracking store.

    Every call to the store goes through `_call`: the first failure of the store itself (unreachable, 5xx after
    MLflow's retries) marks it down, and from then on calls are skipped, not retried, until the background
    thread's probe gets an answer. A dead server so costs training one failed call (about 5 s with the
    settings below), not a failed call per logged value. Once the store answers again, the finished trials
    without a run are logged from the Optuna storage; the same happens when the parent run is opened (a study
    run) and when the tracker closes after an outage.
    """

    def __init__(self, tracking_uri: str, experiment: str, flush_interval: float = 2.0) -> None:
        # A dead tracking server must not stall training for minutes (MLflow's defaults: 7 retries, 120 s each;
        # these give about 5 s for a refused connection, about 35 s for a server that accepts and hangs).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        check_tracking_uri(tracking_uri)
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self._experiment(experiment)
        self._pending: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._warned: set[str] = set()
        self._interval = flush_interval
        self._down = False
        self._next_probe = 0.0
        self._unsynced = False  # a call failed since the last sync: some trial may lack its run or its end
        self._outages = 0
        self._study: Any = None  # set by parent_run(): the Optuna study whose runs this tracker can sync
        self._parent: str | None = None
        self.live: Mapping[int, Any] = {}
        """Trials whose runs are being logged (by number): a sync leaves them alone, their end may be queued."""
        self._sync_lock = threading.Lock()
        self._deferred: list[tuple[str, Any, tuple, dict]] = []
        self._thread = threading.Thread(target=self._loop, name="regsearch-mlflow", daemon=True)
        self._thread.start()

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another worker created it a moment ago
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _warn(self, what: str, exc: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning("MLflow (%s): %s failed, training goes on: %s", mask_url(self.uri), what, error_gist(exc))

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
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
        if not _is_outage(exc):
            self._warn(what, exc)
            return
        if not self._down:
            self._down = True
            self._outages += 1
            self._next_probe = time.monotonic() + _PROBE_SECONDS
            logger.warning("MLflow (%s) does not answer (%s failed: %s); training goes on, and the trials that "
                           "finish meanwhile are logged once it is back (or by `regsearch sync`)",
                           mask_url(self.uri), what, error_gist(exc))

    def _probe(self) -> None:
        """Ask a store marked down whether it answers again; if it does, send what waited and sync."""
        self._next_probe = time.monotonic() + _PROBE_SECONDS
        try:
            self.client.get_experiment(self.experiment_id)
        except Exception:
            return
        self._down = False
        self._warned.clear()
        logger.warning("MLflow (%s) is back; logging the trials that finished meanwhile", mask_url(self.uri))
        self.flush()
        self.sync()
        self._replay()

    # --- runs --------------------------------------------------------------------------------------------

    def parent_run(self, study: Any, run_name: str, params: Mapping[str, Any], *, sync: bool = True) -> str:
        """The study's parent run, created once and remembered in the study's user attributes.

        Processes started at the same moment on several machines agree on one parent run: creating an Optuna
        study is atomic in every storage, so a marker study decides which process creates the run; the
        others wait for its id to appear. With `sync`, the finished trials that have no run yet (the store was
        unreachable when they ran) are logged now, and again whenever the store comes back.
        """
        run = self._parent_run(study)
        if run is None:
            run_id = self._create_parent(study, run_name, params)
        else:
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        self._study, self._parent = study, run_id
        if sync:
            self.sync()
        return run_id

    def _create_parent(self, study: Any, run_name: str, params: Mapping[str, Any]) -> str:
        import optuna

        digest = hashlib.sha1(f"{self.uri}|{self.experiment_id}".encode()).hexdigest()[:10]
        marker = f"{study.study_name}.regsearch-parent-run.{digest}"
        try:
            optuna.create_study(study_name=marker, storage=study._storage)
        except optuna.exceptions.DuplicatedStudyError:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.2)
                run_id = self.find_parent(study)
                if run_id:
                    return run_id
            logger.warning("MLflow: no parent run appeared for study %s within 60 s; creating one",
                           study.study_name)
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"regsearch.study": run_name, "regsearch.role": "study"})
        run_id = run.info.run_id
        self._log_now(run_id, params=params)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return run_id

    def find_parent(self, study: Any) -> str | None:
        """The id of the study's parent run in this experiment, if the study has one that is not deleted."""
        run = self._parent_run(study)
        return run.info.run_id if run is not None else None

    def _parent_run(self, study: Any) -> Any:
        run_id = study._storage.get_study_user_attrs(study._study_id).get(PARENT_RUN_ATTR)
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    return run
            except Exception:  # the run is gone (another tracking store, deleted): make a new one
                pass
        return None

    def sync(self) -> Any:
        """Log the study's finished trials that lack a run, end their runs left RUNNING; a warning on failure.

        Returns the `SyncReport`, or None when there was nothing to sync with or the store did not answer.
        """
        if self._study is None or self._down:
            return None
        from regsearch._sync import sync_runs

        with self._sync_lock:
            self._unsynced = False
            try:
                report = sync_runs(self._study, self, self._parent, skip=set(self.live))
            except Exception as exc:
                self._failed("logging the missing trial runs", exc)
                return None
        if report.logged or report.ended:
            logger.info("MLflow (%s): %s", mask_url(self.uri), report.describe())
        return report

    def start_trial(self, parent_run_id: str, number: int, study_name: str) -> str | None:
        run = self._call("creating a trial run", self.client.create_run, self.experiment_id,
                         run_name=f"trial-{number}", tags={
                             "mlflow.parentRunId": parent_run_id, "trial_number": str(number),
                             "regsearch.study": study_name, "regsearch.state": "RUNNING"})
        return run.info.run_id if run is not None else None

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        """Log a trial's parameters; if the store is down, once it is back (a run cut off keeps them)."""
        if run_id is not None:
            self._now_or_later("logging parameters", log_batches, self.client, run_id, params=params)

    def log_epoch(self, run_id: str | None, step: int, metrics: Mapping[str, float], *,
                  at_ms: int | None = None) -> None:
        """Queue one epoch's metrics (measured at `at_ms`, else now); the background thread sends them in batches."""
        if run_id is None:
            return
        from mlflow.entities import Metric

        now = at_ms if at_ms is not None else int(time.time() * 1000)
        with self._lock:
            self._pending.extend((run_id, Metric(k, float(v), now, step)) for k, v in metrics.items())
            if len(self._pending) > _MAX_PENDING_METRICS:  # the store has been down for a long time
                del self._pending[:len(self._pending) - _MAX_PENDING_METRICS]
        if len(self._pending) >= _MAX_METRICS_PER_CALL:
            self._wake.set()

    def end_trial(self, run_id: str | None, status: str, tags: Mapping[str, str]) -> None:
        if run_id is None:
            return
        self.flush()
        self._log_now(run_id, tags=tags)
        self._call("ending a trial run", self.client.set_terminated, run_id, status=status)

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

    def log_summary(self, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._now_or_later("logging the study's summary", log_batches, self.client, run_id,
                           metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], tags=tags)

    def end_parent(self, run_id: str, status: str = "FINISHED") -> None:
        self._now_or_later("ending the study run", self.client.set_terminated, run_id, status=status)

    def log_model(self, run_id: str, model: Any, example: Any) -> None:
        """The best trial's model, with an input example (and so a signature), on the study's parent run."""
        self._now_or_later("logging the best model", self._log_model, run_id, model, example)

    def _log_model(self, run_id: str, model: Any, example: Any) -> None:
        import mlflow

        previous = mlflow.get_tracking_uri()
        try:
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=run_id, nested=True):
                if hasattr(example, "cpu"):  # a tensor (numpy arrays come from TrackerProcess)
                    example = example.cpu().numpy()
                mlflow.pytorch.log_model(model.cpu().eval(), name="best_model", **_model_save_options(example))
        finally:
            mlflow.set_tracking_uri(previous)

    def _now_or_later(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Call now or, while the store is down, once it answers again.

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
            self._now_or_later(what, fn, *args, **kwargs)

    # --- batching ----------------------------------------------------------------------------------------

    def _log_now(self, run_id: str, params: Mapping[str, Any] | None = None, metrics: list | None = None,
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
            for i in range(0, len(metrics), _MAX_METRICS_PER_CALL):
                self._call("logging metrics", self.client.log_batch, run_id,
                           metrics=metrics[i:i + _MAX_METRICS_PER_CALL])

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval)
            self._wake.clear()
            if not self._down:
                self.flush()
            elif time.monotonic() >= self._next_probe:
                self._probe()

    def close(self) -> None:
        """Send what is queued; after an outage, log the trials that finished without a run (if it answers)."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
        if self._down:
            self._probe()  # one last try: it flushes and syncs when the store answers
        if self._down:
            logger.warning("MLflow (%s) still does not answer: the trials finished during the outage have no run "
                           "(%d metric values and %d other records not sent); `regsearch sync` logs them from "
                           "the Optuna storage once it is back", mask_url(self.uri), len(self._pending),
                           len(self._deferred))
            return
        self.flush()
        if self._unsynced or self._outages:  # a trial started during an outage may have finished since
            self.sync()
        self._replay()

    def log_artifact(self, run_id: str, name: str, data: bytes) -> None:
        """A file `name` holding `data` on a run (the study run's report)."""
        import tempfile

        def log() -> None:
            with tempfile.TemporaryDirectory(prefix="regsearch-artifact-") as folder:
                path = os.path.join(folder, name)
                with open(path, "wb") as f:
                    f.write(data)
                self.client.log_artifact(run_id, path)

        self._now_or_later(f"logging {name}", log)

    def log_pareto_front(self, run_id: str, front: list[Mapping[str, Any]]) -> None:
        """A pareto study's front on its study run: `pareto_front.json` (one row per trial) and its size."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._now_or_later("logging the Pareto front", log_batches, self.client, run_id,
                           metrics=[Metric("pareto_front_size", float(len(front)), now, 0)])
        self._now_or_later("logging the Pareto front", self.client.log_dict, run_id, {"trials": list(front)},
                           "pareto_front.json")


class TrackerProcess:
    """A study's handle on a `Tracker` that runs in a child process (see the module's docstring).

    Every call is a message, sent without waiting, and the child carries them out in order. A trial's run is
    named here by the trial's number; its MLflow run id comes back asynchronously (`run_id`). What was sent
    is not lost when this process is interrupted or killed: the child finishes its queue before it exits,
    and `close` waits for it (and for the best model). When the child cannot use the store, a warning says
    so and training goes on; `regsearch sync` logs the trials later.
    """

    _CLOSE_WAIT_S = 300.0
    _RUN_WAIT_S = 30.0

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        check_tracking_uri(tracking_uri)
        from multiprocessing.connection import Connection

        self.uri = tracking_uri
        self._replies: dict[Any, Any] = {}
        self._dead = False
        self._closed = False
        mine, theirs = socket.socketpair()
        self._conn = Connection(mine.detach())
        level = logging.getLogger("regsearch").getEffectiveLevel()
        # the child imports regsearch from where this process did, whatever its sys.path
        here = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from regsearch._tracking import serve; serve()", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        self._send("open", tracking_uri, experiment, level)

    def _send(self, *message: Any) -> None:
        if self._dead:
            return
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:
            self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        if not self._dead:
            self._dead = True
            logger.warning("MLflow (%s): the tracking process stopped%s; training goes on, and `regsearch sync` "
                           "logs the trials it missed", mask_url(self.uri), f" ({error_gist(exc)})" if exc else "")

    def _wait(self, key: Any, timeout: float) -> Any:
        """The child's answer named `key`, reading answers until it comes (None after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while key not in self._replies and ("failed", None) not in self._replies and not self._dead:
            try:
                if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                    return None
                kind, name, value = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._lost(None if isinstance(exc, EOFError) else exc)
                return None
            self._replies[(kind, name)] = value
        return self._replies.get(key)

    def parent_run(self, study: Any, run_name: str, params: Mapping[str, Any], *, storage: str | None,
                   ends_study: bool = True) -> None:
        """Open the study's parent run (in the child). Raises StorageError when MLflow cannot take this URI.

        `ends_study`: this process logs the best model and the report at the end, so the child prepares for
        both while the study trains (a `--workers` worker's child does not).
        """
        accepted = self._wait(("accepted", None), 120.0)
        if isinstance(accepted, str):
            self.close(wait=False)
            raise StorageError(accepted)
        self._send("parent", storage, study.study_name, run_name, dict(params), ends_study)

    def parent_run_id(self, timeout: float = 120.0) -> str | None:
        return self._wait(("parent", None), timeout)

    def start_trial(self, parent_run_id: Any, number: int, study_name: str) -> int:
        """Open trial `number`'s run under the study run (the child's; `parent_run_id` is not needed)."""
        self._send("start", number, study_name)
        return number

    def run_id(self, number: int | None, *, final: bool = False) -> str | None:
        """The MLflow run id of trial `number`'s run (None if the child could not make it, or not yet).

        Waits for the child (up to `_RUN_WAIT_S`) only when `final` (the trial ends: the id must be stored before
        it does); during the trial the id is taken when it has come, and the trial never waits for it. (The
        child makes the run as soon as it reads the trial's start; a run whose id was not stored yet is found by
        its trial number when a killed worker's trial is ended.)
        """
        if number is None:
            return None
        return self._wait(("run", number), self._RUN_WAIT_S if final else 0.0)

    def log_params(self, number: int | None, params: Mapping[str, Any]) -> None:
        if number is not None:
            self._send("params", number, dict(params))

    def log_epoch(self, number: int | None, step: int, metrics: Mapping[str, float]) -> None:
        if number is not None:
            self._send("epoch", number, step, dict(metrics), int(time.time() * 1000))

    def end_trial(self, number: int | None, status: str, tags: Mapping[str, str]) -> None:
        if number is not None:
            self._send("end", number, status, dict(tags))

    def end_dead_trial(self, run_id: str | None, number: int, status: str, tags: Mapping[str, str]) -> None:
        self._send("end_dead", run_id, number, status, dict(tags))

    def log_summary(self, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        self._send("summary", dict(metrics), dict(tags))

    def log_model(self, model: Any, example: Any) -> None:
        """The best model, pickled here (as MLflow would) and logged by the child while this process goes on."""
        try:
            import cloudpickle

            from regsearch._registry import PLUGIN_MODULE_PREFIX

            # what a `--plugin` file defines (layers, hooks) lives in a module the child cannot import by name:
            # send it by value
            for name, module in list(sys.modules.items()):
                if name.startswith(PLUGIN_MODULE_PREFIX):
                    cloudpickle.register_pickle_by_value(module)
            blob = cloudpickle.dumps(model.cpu().eval())
        except Exception as exc:
            logger.warning("MLflow (%s): the best model cannot be pickled, so it is not logged: %s",
                           mask_url(self.uri), error_gist(exc))
            return
        self._send("model", blob, example.cpu().numpy())

    def log_pareto_front(self, parent_run_id: Any, front: list[Mapping[str, Any]]) -> None:
        """A pareto study's front on the study run (the child's; `parent_run_id` is not needed)."""
        self._send("pareto", [dict(row) for row in front])

    def log_report(self) -> None:
        """The study's report (`regsearch report`'s HTML) on the study run, drawn by the child from the storage.

        Drawn there, not here: the child imported matplotlib and drew once while the study trained, and logs the
        best model meanwhile; this process only waits for it at `close`.
        """
        self._send("report")

    def end_parent(self, status: str = "FINISHED") -> None:
        self._send("end_parent", status)

    def close(self, *, wait: bool = True) -> None:
        """Let the child carry out everything sent (the best model included) and exit; with `wait`, wait for it.

        Without `wait` (the study stops before it started, on an error) the child finishes on its own.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):  # a child that already stopped needs no message
            if not self._dead:
                self._conn.send(("close",))
        try:
            if wait:
                self._proc.wait(timeout=self._CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            logger.warning("MLflow (%s): the tracking process did not finish within %.0f s; it goes on on its own",
                           mask_url(self.uri), self._CLOSE_WAIT_S)
        finally:
            self._conn.close()


def serve() -> None:
    """The child process of `TrackerProcess`: carry out its messages in order on a `Tracker`."""
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _serve(Connection(int(sys.argv[1])))
    except (EOFError, OSError):
        pass  # the study's process stopped before the set-up was done (an error in its set-up)
    sys.stderr.flush()
    os._exit(0)  # everything is sent; tearing down torch and MLflow would only keep the study waiting


def _serve(conn: Any) -> None:
    _, uri, experiment, level = conn.recv()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    if level > logging.DEBUG:
        for noisy in ("mlflow", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        _tracking_store_registry.get_store_builder(uri)
    except Exception as exc:
        conn.send(("accepted", None, error_gist(exc)))
        return
    conn.send(("accepted", None, True))
    first = conn.recv() if conn.poll(0) else None
    if first is not None and first[0] == "close":
        return  # the study stopped on an error of its own: make no store
    try:
        tracker = Tracker(uri, experiment)
    except Exception as exc:
        logger.warning("MLflow (%s): cannot use the tracking store, training goes on without it (`regsearch sync` "
                       "logs the trials later): %s", mask_url(uri), error_gist(exc))
        conn.send(("failed", None, error_gist(exc)))
        while conn.recv()[0] != "close":  # read and drop what the study sends, until it closes
            pass
        return
    _Served(tracker, conn, first).run()


_WHAT = {"pareto": "logging the Pareto front", "report": "logging the study's report",
         "parent": "opening the study run", "start": "creating a trial run", "params": "logging parameters",
         "epoch": "logging metrics", "end": "ending a trial run", "end_dead": "ending a dead trial's run",
         "summary": "logging the study's summary", "model": "logging the best model",
         "end_parent": "ending the study run"}


class _Served:
    """The child's side: trial numbers to run ids, and one handler per message.

    A reader thread takes every message off the socket at once, so that the study's process never waits on a
    full socket while a call to the store is slow (an outage can hold one for seconds); it makes a trial's run
    itself, ahead of the queue. The trial's own later messages are queued after that, so they find its run.
    """

    def __init__(self, tracker: Tracker, conn: Any, first: tuple | None = None) -> None:
        import queue

        self.tracker = tracker
        self.conn = conn
        self.runs: dict[int, str | None] = {}  # the trials started and not yet ended
        tracker.live = self.runs
        self.parent: str | None = None
        self.study: Any = None  # the Optuna study, loaded from its storage when the study run opens
        self.warm: _WarmUp | None = None  # started once the study run is open, where this process ends the study
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        if first is not None:
            self.inbox.put(first)
        threading.Thread(target=self._read, name="regsearch-mlflow-reader", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = ("close",)  # the study's process is gone: finish what it sent
            if message[0] == "start" and self.parent is not None:
                # at once, not after the previous trial's records: the run exists while the trial trains, and its
                # id is ready when the trial ends (the study waits for it then)
                self._handle(message)
                continue
            self.inbox.put(message)
            if message[0] == "close":
                return

    def run(self) -> None:
        try:
            while True:
                message = self.inbox.get()
                if message[0] == "close":
                    break
                self._handle(message)
        finally:
            self.tracker.close()
            if self.warm is not None:
                self.warm.clean()

    def _handle(self, message: tuple) -> None:
        try:
            getattr(self, f"on_{message[0]}")(*message[1:])
        except Exception as exc:
            self.tracker._warn(_WHAT.get(message[0], message[0]), exc)

    def _reply(self, kind: str, name: Any, value: Any) -> None:
        try:
            self.conn.send((kind, name, value))
        except OSError:
            pass

    def on_parent(self, storage: str | None, study_name: str, run_name: str, params: dict, ends_study: bool) -> None:
        import optuna

        from regsearch._storage import open_storage

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = self.study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
        try:
            self.parent = self.tracker.parent_run(study, run_name, params, sync=False)
        finally:
            self._reply("parent", None, self.parent)
        # trials of an earlier run that the store missed; this process's own trials are not finished yet, or
        # their runs were already made from the messages read before (and read now)
        self._drain()
        self.tracker.sync()
        if ends_study:  # the best model and the report come at the end: prepare for them while the study trains
            self.warm = _WarmUp()

    def _drain(self) -> None:
        """Carry out the messages already read, up to a close (put back for `run`)."""
        import queue

        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "close":
                self.inbox.put(message)
                return
            self._handle(message)

    def on_start(self, number: int, study_name: str) -> None:
        run_id = self.tracker.start_trial(self.parent, number, study_name) if self.parent else None
        self.runs[number] = run_id
        self._reply("run", number, run_id)

    def on_params(self, number: int, params: dict) -> None:
        self.tracker.log_params(self.runs.get(number), params)

    def on_epoch(self, number: int, step: int, metrics: dict, at_ms: int) -> None:
        self.tracker.log_epoch(self.runs.get(number), step, metrics, at_ms=at_ms)

    def on_end(self, number: int, status: str, tags: dict) -> None:
        self.tracker.end_trial(self.runs.pop(number, None), status, tags)

    def on_end_dead(self, run_id: str | None, number: int, status: str, tags: dict) -> None:
        self.tracker.end_dead_trial(run_id, number, status, tags)

    def on_summary(self, metrics: dict, tags: dict) -> None:
        if self.parent:
            self.tracker.log_summary(self.parent, metrics, tags)

    def on_model(self, blob: bytes, example: Any) -> None:
        if self.parent:
            if self.warm is not None:
                self.warm.wait_for_model()
            self.tracker.log_model(self.parent, pickle.loads(blob), example)

    def on_pareto(self, front: list) -> None:
        if self.parent:
            self.tracker.log_pareto_front(self.parent, front)

    def on_report(self) -> None:
        if not self.parent:
            return
        if self.warm is not None:
            self.warm.wait()
        from regsearch import report as _report

        try:
            with _no_gc():
                page = _report.render(self.study, "html")
        except Exception as exc:  # drawing, not MLflow, failed: say so in its own words
            logger.warning("the study's report was not drawn, so it is not on the MLflow run: %s", error_gist(exc))
            return
        self.tracker.log_artifact(self.parent, _report.file_name(self.study.study_name, "html"), page)

    def on_end_parent(self, status: str) -> None:
        if self.parent:
            self.tracker.end_parent(self.parent, status)


class _WarmUp:
    """What the end of the study does for the first time, done by a thread while the study trains.

    Saving a PyTorch model imports torch's exporter, traces for the first time and scans the installed packages;
    the first report imports matplotlib and Optuna's importance evaluators (seconds). The best model waits for
    the model's part (torch's exporter is not safe in two threads at once), the report for all of it; neither
    waits longer than `LIMIT_S`, so a warm-up stuck on, say, a slow file system cannot keep the study run open.
    """

    LIMIT_S = 120.0
    CLEAN_WAIT_S = 5.0

    def __init__(self) -> None:
        self.scratch: str | None = None  # where the throwaway model goes; removed as the tracking process ends
        self.model_done = threading.Event()
        self._lock = threading.Lock()
        self._ended = False  # the tracking process is ending: make no folder any more
        self.thread = threading.Thread(target=self._run, name="regsearch-mlflow-warm", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self._lock:
                if self._ended:
                    return
                self.scratch = tempfile.mkdtemp(prefix="regsearch-warm-")
            _warm_up_model(self.scratch)
        except OSError:
            pass  # no temporary folder: the best model is saved without a rehearsal
        finally:
            self.model_done.set()
        with contextlib.suppress(Exception):
            _warm_up_report()
        # what is imported and set up by now lives as long as the process: the collector need not look at it again
        # (the warm-up's own garbage is collected first, not kept for good)
        gc.collect()
        gc.freeze()

    def wait_for_model(self) -> None:
        self.model_done.wait(self.LIMIT_S)

    def wait(self) -> None:
        self.thread.join(self.LIMIT_S)

    def clean(self) -> None:
        """Remove the throwaway model; a study that ended early may find it being saved: wait a little for that."""
        with self._lock:
            self._ended = True
        if self.scratch:
            self.model_done.wait(self.CLEAN_WAIT_S)
            shutil.rmtree(self.scratch, ignore_errors=True)


@contextlib.contextmanager
def _no_gc():
    """No garbage collection meanwhile (collected after): matplotlib makes many cycles as it draws, and each full
    collection walked the whole of this process (torch, MLflow, SQLAlchemy): a third of a report's drawing time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _model_save_options(example: Any) -> dict[str, Any]:
    """How the best model is saved (and the warm-up's throwaway one, so that it rehearses the same path)."""
    import torch

    return {"input_example": example, "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"]}


def _warm_up_model(scratch: str) -> None:
    """Save a throwaway two-number model as the best model will be saved, and what logging it imports."""
    import importlib

    with contextlib.suppress(Exception):
        import mlflow.pytorch
        import numpy
        import torch
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()  # a scan of every installed package, cached
        mlflow.pytorch.save_model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()).eval(),
                                  os.path.join(scratch, "model"),
                                  **_model_save_options(numpy.zeros((2, 2), dtype="float32")))
    with contextlib.suppress(Exception):  # the run's git context, read when the model is logged
        from mlflow.tracking.context.registry import resolve_tags

        resolve_tags()
    # validating the logged model's serving input
    for name in ("mlflow.pyfunc.scoring_server", "mlflow.models.display_utils", "mlflow.tracing.processor.otel"):
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def _warm_up_report() -> None:
    """Import matplotlib and Optuna's importance evaluators (scipy, scikit-learn) and draw a first figure."""
    import optuna.importance  # noqa: F401

    from regsearch import report as _report

    _report.warm_up()


def error_gist(exc: BaseException) -> str:
    """The gist of an error in one line: the OS's reason for a failed connection, else the first line."""
    text = mask_url(str(exc)).strip()
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno.group(1).strip().rstrip(".")
    if "timed out" in text.lower():
        return "timed out"
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
