"""Where MLflow keeps a study's runs: the default URI, checks of a local store before training, an error's gist."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from regsearch import _thirdparty
from regsearch._errors import StorageError
from regsearch._storage import local_store_problem, mask_url, sqlite_path

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger("regsearch")


PARENT_RUN_ATTR = "mlflow_parent_run_id"


MODEL_ATTR = "mlflow_best_model"
"""A study attribute: {"uri", "run_id", "experiment_id"} of the best model logged on the study run."""




_STORE_LOCK_S = 600.0
"""How long a process waits for another one that is creating or migrating the same sqlite tracking store."""


_MIGRATION_COPY = "_alembic_tmp_"
"""Alembic alters a SQLite table by copying it into `_alembic_tmp_<table>`; a migration stopped midway leaves it."""


def open_client(uri: str) -> MlflowClient:
    """An `MlflowClient` on `uri`; a sqlite store is created, migrated or repaired by one process at a time.

    MLflow migrates a new store without a lock: processes that start together on a fresh file race, and can leave
    it half-migrated for good (`table _alembic_tmp_experiments already exists`). The lock file is `FILE.lock`.
    """
    from mlflow import MlflowClient

    path = sqlite_path(uri) if uri.split(":", 1)[0].split("+", 1)[0].lower() == "sqlite" else None
    if path is None:
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock, Timeout

    try:
        with FileLock(f"{path}.lock", timeout=_STORE_LOCK_S):
            _finish_interrupted_migration(uri, path)
            return MlflowClient(tracking_uri=uri)  # creates and migrates a new store
    except Timeout:
        raise StorageError(f"another process has been creating or migrating {path} for {_STORE_LOCK_S:.0f} s "
                           f"(it holds {path}.lock)") from None


def _finish_interrupted_migration(uri: str, path: Path) -> None:
    """Drop the table copies a migration stopped midway left in a sqlite store, and migrate it again.

    MLflow refuses such a store for good. A copy is dropped only while its table is there (the data is in the
    table, the copy is a stray); a copy without its table holds the only data, so the store is refused instead.
    """
    if not path.is_file():
        return
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        copies = sorted(t for t in tables if t.startswith(_MIGRATION_COPY))
        if not copies:
            return
        alone = [t for t in copies if t[len(_MIGRATION_COPY):] not in tables]
        if alone:
            raise StorageError(f"{path}: an MLflow migration stopped midway and left table {alone[0]} as the only "
                               f"copy of table {alone[0][len(_MIGRATION_COPY):]}; restore the file from a backup, "
                               "or move it aside to start a new store")
        for table in copies:
            db.execute(f'DROP TABLE "{table}"')
        db.commit()
    logger.warning("MLflow (%s): a migration of the store had stopped midway; dropped the leftover table%s %s and "
                   "migrated it again", mask_url(uri), "s" if len(copies) > 1 else "", ", ".join(copies))
    from mlflow.store.db.utils import create_sqlalchemy_engine

    engine = create_sqlalchemy_engine(uri)
    try:
        _thirdparty.upgrade_mlflow_db(engine)
    finally:
        engine.dispose()


def is_full(exc: BaseException) -> bool:
    """A failure because the disk holding the store is full (SQLite's words, or the OS's)."""
    text = str(exc)
    return "database or disk is full" in text or "No space left on device" in text


def default_tracking_uri() -> str:
    """MLflow's own default, made explicit: `mlflow.db` in the current folder (found by a plain `mlflow ui`)."""
    return f"sqlite:///{os.path.abspath('mlflow.db')}"




def local_tracking_path(uri: str) -> tuple[Path, bool] | None:
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
    local = local_tracking_path(uri)
    if local is None:
        return
    path, folder = local
    problem = local_store_problem(path, folder=folder)
    if problem:
        raise StorageError(problem)
    if folder and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        raise StorageError("MLflow 3 takes a file store only with MLFLOW_ALLOW_FILE_STORE=true; use a database "
                           f"such as sqlite:///{path.parent / 'mlflow.db'}")


def is_outage(exc: BaseException) -> bool:
    """A failure of the store itself (unreachable, 5xx after retries), not a request it refused (4xx) or a bug."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, OSError)  # connection errors and timeouts (requests' exceptions are OSErrors)


def error_gist(exc: BaseException) -> str:
    """The gist of an error in one line: the OS's reason for a failed connection, else the first line."""
    text = mask_url(str(exc)).strip()
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno.group(1).strip().rstrip(".")
    if "timed out" in text.lower():
        return "timed out"
    lines = [line for line in text.splitlines() if not line.startswith("(raised as a result of Query-invoked")]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
