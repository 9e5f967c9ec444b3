"""The study's side of the tracking process: every call a message, sent without waiting."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from regsearch._errors import StorageError
from regsearch._storage import mask_url
from regsearch.tracking._store import check_tracking_uri, error_gist

logger = logging.getLogger("regsearch")


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

    def __init__(self, tracking_uri: str, conn: Any, proc: subprocess.Popen) -> None:
        self.uri = tracking_uri
        self._conn = conn
        self._proc = proc
        self._replies: dict[Any, Any] = {}
        self._dead = False
        self._closed = False

    @classmethod
    def start(cls, tracking_uri: str, experiment: str) -> TrackerProcess:
        """Start the tracking process on the store at `tracking_uri`, for the study's experiment."""
        check_tracking_uri(tracking_uri)
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        # the child imports regsearch from where this process did, whatever its sys.path
        here = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from regsearch.tracking._served import serve; serve()", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        process = cls(tracking_uri, Connection(mine.detach()), proc)
        process._send("open", tracking_uri, experiment, logging.getLogger("regsearch").getEffectiveLevel())
        return process

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

    def start_trial(self, parent_run_id: Any, number: int, study_name: str, *, start_ms: int | None = None) -> int:
        """Open trial `number`'s run under the study run (the child's; `parent_run_id` is not needed).

        The run starts at `start_ms` (the trial's start; else now), not when the child gets to it.
        """
        self._send("start", number, study_name, start_ms if start_ms is not None else int(time.time() * 1000))
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
        """End trial `number`'s run now, as the trial ends, whenever the child gets to it."""
        if number is not None:
            self._send("end", number, status, dict(tags), int(time.time() * 1000))

    def end_dead_trial(self, run_id: str | None, number: int, status: str, tags: Mapping[str, str]) -> None:
        self._send("end_dead", run_id, number, status, dict(tags))

    def log_summary(self, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        self._send("summary", dict(metrics), dict(tags))

    def log_model(self, predictor: Any, example: Any, register: tuple[str, dict] | None = None) -> None:
        """The best model (a `Predictor`, with raw inputs `example`), pickled here and logged by the child while
        this process goes on; with `register` (name, tags), registered as a new version of that model too."""
        try:
            import cloudpickle

            from regsearch.tracking._predictor import by_value

            # regsearch, a `--plugin` file, a user's own module beside their script: the child (and a process
            # that loads the model) may not import them by name, so they travel by value
            with by_value():
                blob = cloudpickle.dumps(predictor)
        except Exception as exc:
            logger.warning("MLflow (%s): the best model cannot be pickled, so it is not logged: %s",
                           mask_url(self.uri), error_gist(exc))
            return
        self._send("model", blob, example, register)

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

    def close(self, *, wait: bool = True) -> int | None:
        """Let the child carry out everything sent (the best model included) and exit; with `wait`, wait for it.

        Without `wait` (the study stops before it started, on an error) the child finishes on its own. Returns how
        many of the study's finished trials MLflow lacks, as the child found at its end (None: unknown).
        """
        if self._closed:
            return None
        self._closed = True
        with contextlib.suppress(OSError, ValueError):  # a child that already stopped needs no message
            if not self._dead:
                self._conn.send(("close",))
        try:
            if wait:
                self._proc.wait(timeout=self._CLOSE_WAIT_S)
                return self._missing_runs()
        except subprocess.TimeoutExpired:
            logger.warning("MLflow (%s): the tracking process did not finish within %.0f s; it goes on on its own",
                           mask_url(self.uri), self._CLOSE_WAIT_S)
        finally:
            self._conn.close()
        return None

    def _missing_runs(self) -> int | None:
        """The count the child sent as it ended, read from what it left unread (no warning if it sent none)."""
        with contextlib.suppress(EOFError, OSError):
            while ("closed", None) not in self._replies and self._conn.poll(0):
                kind, name, value = self._conn.recv()
                self._replies[(kind, name)] = value
        return self._replies.get(("closed", None))
