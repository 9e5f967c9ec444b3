"""`Tracking` through a child process: every call a message (see `_messages`), sent without waiting."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from regsearch._storage import mask_url
from regsearch.tracking import _messages as m
from regsearch.tracking._store import check_tracking_uri, error_gist

if TYPE_CHECKING:
    import optuna

    from regsearch.tracking._port import Example, Registration
    from regsearch.tracking._predictor import Predictor

logger = logging.getLogger("regsearch")


def _now_ms() -> int:
    return int(time.time() * 1000)


def source_name() -> str:
    """What the runs and the logged model say they were logged from: the main file, else `regsearch`."""
    main = sys.argv[0] if sys.argv else ""
    return main if main and os.path.isfile(main) else "regsearch"


class TrackerProcess:
    """A study's `Tracking` carried out by a `LocalTracking` in a child process (see `tracking`'s docstring).

    Every call is a message, sent without waiting, and the child carries them out in order. What was sent is not
    lost when this process is interrupted or killed: the child finishes its queue before it exits, and `close`
    waits for it (and for the best model). When the child cannot use the store, a warning says so and training
    goes on; `regsearch sync` logs the trials later.
    """

    _CLOSE_WAIT_S = 300.0
    _RUN_WAIT_S = 30.0

    def __init__(self, tracking_uri: str, conn: Connection, proc: subprocess.Popen) -> None:
        self.uri = tracking_uri
        self._conn = conn
        self._proc = proc
        self._replies: dict[tuple[type, int | None], m.Reply] = {}
        self._dead = False
        self._closed = False

    @classmethod
    def start(cls, tracking_uri: str, experiment: str) -> TrackerProcess:
        """Start the tracking process on the store at `tracking_uri`, for the study's experiment."""
        check_tracking_uri(tracking_uri)
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
        process._send(m.Open(tracking_uri, experiment, logging.getLogger("regsearch").getEffectiveLevel(),
                             source_name()))
        return process

    def _send(self, message: m.Message | m.Open | m.Close) -> None:
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

    def _read(self) -> None:
        reply = self._conn.recv()
        self._replies[(type(reply), getattr(reply, "number", None))] = reply

    def _wait(self, kind: type, timeout: float, number: int | None = None) -> m.Reply | None:
        """The child's reply of type `kind` (about trial `number`), reading replies until it comes (None after
        `timeout` s, or when the child could not open the store)."""
        deadline = time.monotonic() + timeout
        while ((kind, number) not in self._replies and (m.Failed, None) not in self._replies
               and not self._dead):
            try:
                if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                    return None
                self._read()
            except (EOFError, OSError) as exc:
                self._lost(None if isinstance(exc, EOFError) else exc)
                return None
        return self._replies.get((kind, number))

    def parent_run(self, study: optuna.Study, run_name: str, params: Mapping[str, object], *,
                   storage: str | None, ends_study: bool = True) -> None:
        """Open the study's parent run (in the child). Raises StorageError when MLflow cannot take this URI."""
        from regsearch._errors import StorageError

        accepted = self._wait(m.Accepted, 120.0)
        if isinstance(accepted, m.Accepted) and accepted.error is not None:
            self.close(wait=False)
            raise StorageError(accepted.error)
        self._send(m.StartStudy(storage, study.study_name, run_name, dict(params), ends_study))

    def parent_run_id(self, timeout: float = 120.0) -> str | None:
        reply = self._wait(m.StudyRun, timeout)
        return reply.run_id if isinstance(reply, m.StudyRun) else None

    def start_trial(self, number: int, study_name: str, *, start_ms: int | None = None) -> None:
        """The run starts at `start_ms` (the trial's start; else now), not when the child gets to it."""
        self._send(m.StartTrial(number, study_name, start_ms if start_ms is not None else _now_ms()))

    def run_id(self, number: int, *, final: bool = False) -> str | None:
        """Waits for the child (up to `_RUN_WAIT_S`) only when `final` (the trial ends: the id must be stored before
        it does); during the trial the id is taken when it has come, and the trial never waits for it. (A run
        whose id was not stored yet is found by its trial number when a killed worker's trial is ended.)"""
        reply = self._wait(m.TrialRun, self._RUN_WAIT_S if final else 0.0, number)
        return reply.run_id if isinstance(reply, m.TrialRun) else None

    def log_params(self, number: int, params: Mapping[str, object]) -> None:
        self._send(m.LogParams(number, dict(params)))

    def log_epoch(self, number: int, step: int, metrics: Mapping[str, float]) -> None:
        self._send(m.LogEpoch(number, step, dict(metrics), _now_ms()))

    def end_trial(self, number: int, status: str, tags: Mapping[str, str]) -> None:
        self._send(m.EndTrial(number, status, dict(tags), _now_ms()))

    def end_dead_trial(self, run_id: str | None, number: int, status: str, tags: Mapping[str, str]) -> None:
        self._send(m.EndDeadTrial(run_id, number, status, dict(tags)))

    def log_summary(self, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        self._send(m.LogSummary(dict(metrics), dict(tags)))

    def log_model(self, predictor: Predictor, example: Example, register: Registration | None = None) -> None:
        """Pickled here, logged by the child while this process goes on."""
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
        self._send(m.LogModel(blob, example, register))

    def log_pareto_front(self, front: Sequence[Mapping[str, object]]) -> None:
        self._send(m.LogParetoFront([dict(row) for row in front]))

    def log_report(self) -> None:
        """Drawn by the child from the storage: it imported matplotlib and drew once while the study trained."""
        self._send(m.LogReport())

    def end_parent(self, status: str = "FINISHED") -> None:
        self._send(m.EndStudy(status))

    def close(self, *, wait: bool = True) -> int | None:
        """Let the child carry out everything sent (the best model included) and exit; with `wait`, wait for it.

        Without `wait` (the study stops before it started, on an error) the child finishes on its own.
        """
        if self._closed:
            return None
        self._closed = True
        with contextlib.suppress(OSError, ValueError):  # a child that already stopped needs no message
            if not self._dead:
                self._conn.send(m.Close())
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
            while (m.Closed, None) not in self._replies and self._conn.poll(0):
                self._read()
        closed = self._replies.get((m.Closed, None))
        return closed.missing if isinstance(closed, m.Closed) else None
