"""The tracking process: it carries out the study's messages in order on a `LocalTracking`."""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection

from regsearch import _thirdparty
from regsearch._logs import log_to_stderr
from regsearch._storage import mask_url
from regsearch.tracking import _messages as m
from regsearch.tracking._local import LocalTracking
from regsearch.tracking._store import error_gist

logger = logging.getLogger("regsearch")


def serve() -> None:
    """The child process of `TrackerProcess`: carry out its messages in order on a `LocalTracking`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _serve(Connection(int(sys.argv[1])))
    except (EOFError, OSError):
        pass  # the study's process stopped before the set-up was done (an error in its set-up)
    sys.stderr.flush()
    os._exit(0)  # everything is sent; tearing down torch and MLflow would only keep the study waiting


def _set_up_logging(level: int) -> None:
    log_to_stderr(level)
    if level > logging.DEBUG:
        # it logs each failed database call with its traceback before raising it; the warning here says it in a line
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _serve(conn: Connection) -> None:
    opened: m.Open = conn.recv()
    _set_up_logging(opened.level)
    sys.argv[0] = opened.source  # MLflow names a run's and a model's source after the main file
    try:
        _thirdparty.check_mlflow_store(opened.uri)
    except Exception as exc:
        conn.send(m.Accepted(error_gist(exc)))
        return
    conn.send(m.Accepted())
    first = conn.recv() if conn.poll(0) else None
    if isinstance(first, m.Close):
        return  # the study stopped on an error of its own: make no store
    try:
        tracking = LocalTracking.open(opened.uri, opened.experiment, warm=True)
    except Exception as exc:
        logger.warning("MLflow (%s): cannot use the tracking store, training goes on without it (`regsearch sync` "
                       "logs the trials later): %s", mask_url(opened.uri), error_gist(exc))
        conn.send(m.Failed(error_gist(exc)))
        while not isinstance(conn.recv(), m.Close):  # read and drop what the study sends, until it closes
            pass
        return
    _Served(tracking, conn, first).run()


class _Served:
    """The child's side: a reader thread and the queue of messages carried out in order.

    The reader takes every message off the socket at once, so that the study's process never waits on a full
    socket while a call to the store is slow (an outage can hold one for seconds); it makes a trial's run itself,
    ahead of the queue. The trial's own later messages are queued after that, so they find its run.
    """

    def __init__(self, tracking: LocalTracking, conn: Connection, first: m.Message | None) -> None:
        self.tracking = tracking
        self.conn = conn
        self.inbox: queue.SimpleQueue[m.Message | m.Close] = queue.SimpleQueue()
        if first is not None:
            self.inbox.put(first)

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = m.Close()  # the study's process is gone: finish what it sent
            if isinstance(message, m.StartTrial) and self.tracking.parent is not None:
                # at once, not after the previous trial's records: the run exists while the trial trains, and its
                # id is ready when the trial ends (the study waits for it then)
                self._handle(message)
                continue
            self.inbox.put(message)
            if isinstance(message, m.Close):
                return

    def run(self) -> None:
        """Read every message as it comes (a reader thread), carry them out in order, until the study closes."""
        threading.Thread(target=self._read, name="regsearch-mlflow-reader", daemon=True).start()
        try:
            while not isinstance(message := self.inbox.get(), m.Close):
                self._handle(message)
                if isinstance(message, m.StartStudy):
                    self._after_start()
        finally:
            self._reply(m.Closed(self.tracking.close()))

    def _after_start(self) -> None:
        """Carry out the messages already read, then log the trials of an earlier run that the store missed."""
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, m.Close):
                self.inbox.put(message)
                break
            self._handle(message)
        self.tracking.store.sync()

    def _handle(self, message: m.Message) -> None:
        try:
            reply = message.apply(self.tracking)
        except Exception as exc:
            self.tracking.store.warn(message.what, exc)
            reply = m.StudyRun(None) if isinstance(message, m.StartStudy) else None
            if isinstance(message, m.StartTrial):
                reply = m.TrialRun(message.number, None)
        if reply is not None:
            self._reply(reply)

    def _reply(self, reply: m.Reply) -> None:
        try:
            self.conn.send(reply)
        except OSError:
            pass
