"""The tracking process: it carries out the study's messages in order on a `Tracker`."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
from typing import Any

from regsearch._storage import mask_url
from regsearch.tracking._client import Tracker
from regsearch.tracking._store import error_gist
from regsearch.tracking._warmup import WarmUp, no_gc

logger = logging.getLogger("regsearch")


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
        # it logs each failed database call with its traceback before raising it; the warning here says it in a line
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
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
        tracker = Tracker.open(uri, experiment)
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
        self.warm: WarmUp | None = None  # started once the study run is open, where this process ends the study
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        if first is not None:
            self.inbox.put(first)

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
        """Read every message as it comes (a reader thread), carry them out in order, until the study closes."""
        threading.Thread(target=self._read, name="regsearch-mlflow-reader", daemon=True).start()
        try:
            while True:
                message = self.inbox.get()
                if message[0] == "close":
                    break
                self._handle(message)
        finally:
            missing = self.tracker.close()
            self._reply("closed", None, missing)
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
            self.parent = self.tracker.parent_run(study, run_name, params, sync=False, storage=storage)
        finally:
            self._reply("parent", None, self.parent)
        # trials of an earlier run that the store missed; this process's own trials are not finished yet, or
        # their runs were already made from the messages read before (and read now)
        self._drain()
        self.tracker.sync()
        if ends_study:  # the best model and the report come at the end: prepare for them while the study trains
            self.warm = WarmUp().start()

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

    def on_start(self, number: int, study_name: str, start_ms: int | None = None) -> None:
        run_id = self.tracker.start_trial(self.parent, number, study_name, start_ms=start_ms) if self.parent else None
        self.runs[number] = run_id
        self._reply("run", number, run_id)

    def on_params(self, number: int, params: dict) -> None:
        self.tracker.log_params(self.runs.get(number), params)

    def on_epoch(self, number: int, step: int, metrics: dict, at_ms: int) -> None:
        self.tracker.log_epoch(self.runs.get(number), step, metrics, at_ms=at_ms)

    def on_end(self, number: int, status: str, tags: dict, end_ms: int | None = None) -> None:
        self.tracker.end_trial(self.runs.pop(number, None), status, tags, end_ms=end_ms)

    def on_end_dead(self, run_id: str | None, number: int, status: str, tags: dict) -> None:
        self.tracker.end_dead_trial(run_id, number, status, tags)

    def on_summary(self, metrics: dict, tags: dict) -> None:
        if self.parent:
            self.tracker.log_summary(self.parent, metrics, tags)

    def on_model(self, blob: bytes, example: Any, register: tuple[str, dict] | None = None) -> None:
        if self.parent:
            if self.warm is not None:
                # all of it: unpickling a table's fitted encoders imports scikit-learn, which the report's
                # warm-up may be importing in its thread (a half-imported sklearn.base fails the model)
                self.warm.wait()
            self.tracker.log_model(self.parent, pickle.loads(blob), example, register)

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
            with no_gc():
                page = _report.render(self.study, "html")
        except Exception as exc:  # drawing, not MLflow, failed: say so in its own words
            logger.warning("the study's report was not drawn, so it is not on the MLflow run: %s", error_gist(exc))
            return
        self.tracker.log_artifact(self.parent, _report.file_name(self.study.study_name, "html"), page)

    def on_end_parent(self, status: str) -> None:
        if self.parent:
            self.tracker.end_parent(self.parent, status)
