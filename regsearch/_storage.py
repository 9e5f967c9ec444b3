"""Optuna storage from a URL or a file path; the URL's password never leaves this module unmasked."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from regsearch._errors import StorageError

logger = logging.getLogger("regsearch")

DEFAULT_STORAGE = "regsearch.journal"
"""The default: an Optuna journal file in the current folder (safe for several local worker processes)."""

_RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")
_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@]*:)(?P<password>[^@/]*)@")


def mask_url(url: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`."""
    return _PASSWORD.sub(lambda m: f"{m.group('head')}***@", str(url))


def describe_storage(url: str | None) -> str:
    return mask_url(url or DEFAULT_STORAGE)


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (relative with three slashes, absolute with four); None in memory."""
    rest = url.split(":", 1)[1].split("?", 1)[0]
    path = rest[len("//"):].lstrip("/")
    if not path or path == ":memory:":
        return None
    return Path("/" + path if rest.startswith("////") else path)


_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}
_LOOPBACK = ("", "localhost", "127.0.0.1", "::1")


def url_scheme(url: str) -> str | None:
    """The database kind of a storage URL (`postgresql` for `postgresql+psycopg://...`); None for a file path."""
    if "://" not in url:
        return None
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def storage_identity(url: str | None) -> str:
    """The same text for every spelling of one storage, different for different storages.

    A file (journal, SQLite) is its host and real path: the same path on two machines is two storages. A
    database server is its dialect, host, port and database, without driver, user or password; a loopback
    host is this machine's name (`localhost` on two machines is two servers).
    """
    url = url or DEFAULT_STORAGE
    if "://" not in url:
        return f"file:{socket.gethostname()}:{os.path.realpath(os.path.expanduser(url))}"
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    dialect = parsed.get_backend_name()
    if dialect == "sqlite":
        return f"sqlite:{socket.gethostname()}:{os.path.realpath(parsed.database or ':memory:')}"
    dialect = "postgresql" if dialect == "postgres" else dialect
    host = (parsed.host or "").lower()
    host = socket.gethostname() if host in _LOOPBACK else host
    return f"{dialect}://{host}:{parsed.port or _DEFAULT_PORTS.get(dialect, '')}/{parsed.database or ''}"


def _rdb_storage(url: str, scheme: str, heartbeat_interval: int, grace_period: int) -> Any:
    import optuna

    for attempt in range(8):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: stable in use
                return optuna.storages.RDBStorage(
                    url,
                    # a worker that dies stops beating; its trial is failed and retried by a later optimize()
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
                    engine_kwargs={"pool_pre_ping": True} if scheme != "sqlite" else None,
                )
        except Exception as exc:
            # Workers started together on a brand-new database race to create its tables: the losers see a
            # duplicate-key error, or (wrapped by Optuna as "An exception is raised during the commit") another
            # error of the half-made schema, and succeed on a later try, once the tables exist.
            if attempt == 7 or not _lost_a_race(exc):
                raise
            time.sleep(0.2 + random.random() * (attempt + 1) * 0.3)
    raise AssertionError("unreachable")


_RACE_WORDS = ("duplicate", "unique constraint", "already exists", "deadlock", "concurrently", "serialize")


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from, outermost first (the driver's own error is last)."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def _lost_a_race(exc: BaseException) -> bool:
    import optuna

    text = " ".join(str(c) for c in _causes(exc)).lower()
    return any(word in text for word in _RACE_WORDS) or isinstance(exc, optuna.exceptions.StorageInternalError)


MIN_FREE_BYTES = 1 << 20
"""A local store on a disk with less free space than this is refused before training (it would fail midway)."""


def local_store_problem(path: str | os.PathLike[str], *, folder: bool = False, space: bool = True) -> str | None:
    """Why a local store cannot be written at `path` (a file; a folder when `folder`), or None when it can.

    Checked before any training: a missing or read-only folder, a path that is not a regular file (`/dev/full`
    reads as endless zeros and takes every write as "disk full"; `/dev/null` keeps nothing), a full disk (unless
    not `space`).
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
    if not space:
        return None
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    if free < MIN_FREE_BYTES:
        return f"no space left on the disk holding {where} ({free // 1024} KiB free)"
    return None


def open_storage(url: str | None = None, *, heartbeat_interval: int = 30, grace_period: int = 90,
                 create: bool = True) -> Any:
    """An Optuna storage: an RDB URL (sqlite:///, postgresql://, ...) or a journal file path.

    `create=False` (show, report, sync) refuses a missing journal or SQLite file instead of creating an empty one.
    """
    given, url = url is not None, url or DEFAULT_STORAGE
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url).expanduser()
        if path.is_dir():
            raise StorageError(f"--storage {url}: is a folder; give a file path such as {path / DEFAULT_STORAGE}")
        if not create and not path.exists():
            raise _no_stored_study(url if given else None, path)
        if path.exists() and not path.is_file():  # /dev/full reads as endless zeros: the journal never ends
            raise StorageError(f"--storage {url}: {path} is not a regular file")
        problem = local_store_problem(path, space=False)  # a full disk is said by what fails to be written
        if problem:
            raise StorageError(f"--storage {url}: {problem}")
        if path.exists():
            _cut_torn_tail(url, path)
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise StorageError(f"--storage {url}: cannot open the journal file ({exc})") from None
    scheme = url_scheme(url)
    if scheme not in _RDB_SCHEMES:
        raise StorageError(f"--storage {mask_url(url)}: unknown scheme {scheme!r}; use a file path (journal), "
                           f"sqlite:///FILE, postgresql://USER@HOST/DB or mysql://USER@HOST/DB")
    if not create and scheme == "sqlite":

        path = sqlite_path(url)
        if path is not None and not path.expanduser().exists():
            raise _no_stored_study(mask_url(url), path)
    try:
        return _rdb_storage(url, scheme, heartbeat_interval, grace_period)
    except ImportError as exc:
        driver = getattr(exc.__cause__, "name", None) or exc.name or "its driver"
        raise StorageError(f"--storage {mask_url(url)}: the database driver is not installed ({driver}); "
                           f"for PostgreSQL: pip install 'regsearch[postgres]'") from None
    except Exception as exc:  # SQLAlchemy/driver errors carry the URL; report them masked, in one line
        import optuna

        # the driver's words, not Optuna's wrapper ("An exception is raised during the commit ...")
        wrapped = isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None
        driver = exc.__cause__ if wrapped else exc
        reason = mask_url(str(getattr(driver, "orig", None) or driver)).strip().splitlines()[0]
        raise StorageError(f"--storage {mask_url(url)}: cannot open the database: {reason}") from None


def _no_stored_study(url: str | None, path: Path) -> StorageError:
    """The error of a read-only command given no storage file: it names where it looked and what to do."""
    where = f"--storage {url}: " if url else "no study storage here: "
    return StorageError(f"{where}{path.absolute()} does not exist; pass --storage (where the study was stored) or "
                        f"run from the study's folder")


def _torn_tail(path: Path) -> int | None:
    """Where the journal's last line starts when Optuna would not read it (no newline, or not JSON), else None."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        if pos == 0:
            return None
        tail, start = b"", 0
        while pos > 0:  # read backwards until the newline that ends the line before the last one
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            newline = tail.rfind(b"\n", 0, len(tail) - 1)
            if newline >= 0:
                start = pos + newline + 1
                break
    line = tail[start - pos:]
    if line.endswith(b"\n"):
        try:
            json.loads(line)  # what Optuna's JournalFileBackend.read_logs does with each line
            return None
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            pass
    return start


def _cut_torn_tail(url: str, path: Path) -> None:
    """Cut a journal's torn last record (a crash or full disk mid-write), keeping the whole file as a backup.

    Optuna skips a torn last line when reading but appends after it when writing, and then can read nothing.
    """
    if _torn_tail(path) is None:
        return
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))  # the lock Optuna's JournalFileBackend appends under
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}.torn-{stamp}")
    try:
        lock.acquire()
        try:
            start = _torn_tail(path)  # again under the lock: what looked torn may have been an append in flight
            if start is None:
                return
            size = path.stat().st_size
            n = 0
            while backup.exists():  # a second torn record within the same second
                n += 1
                backup = path.with_name(f"{path.name}.torn-{stamp}-{n}")
            try:
                shutil.copyfile(path, backup)
            except OSError:
                backup.unlink(missing_ok=True)  # a partial copy (disk full) is no backup; the journal stays as is
                raise
            with open(path, "r+b") as f:
                f.truncate(start)
                os.fsync(f.fileno())
        finally:
            lock.release()
    except OSError as exc:
        raise StorageError(f"--storage {url}: the journal's last record is torn (a crash or full disk mid-write) "
                           f"and could not be cut, so it is left as it is: {exc}") from None
    logger.warning("%s: cut its torn last record (%d bytes at byte %d, left by a crash or a full disk mid-write); "
                   "the file as it was is kept in %s", path, size - start, start, backup)
