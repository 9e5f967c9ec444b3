"""Shared fixtures: offline runs, the shared CIFAR sample, a real MLflow tracking server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR = REPO.parent / "shared" / "datasets" / "cifar-10-sample-binary.tar.gz"
SHARED_HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera-sample.tar"
STRICT_ENV = "REGSEARCH_TEST_STRICT"
"""Set by .ci/run: a test that would skip for a missing resource (shared data, PostgreSQL) fails instead."""

# Nothing may download at test time; the CIFAR loader raises a clear error instead.
os.environ["REGSEARCH_OFFLINE"] = "1"


def without_dac(command: list[str]) -> list[str]:
    """`command` with file permissions in force even for root (tests often run as root), via setpriv."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, which reads and writes any file, and setpriv (util-linux) is not there to "
                    "drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]


def require(condition: bool, reason: str) -> None:
    """Skip with `reason` on a user's machine; fail in CI, where every resource must be there."""
    if condition:
        return
    if os.environ.get(STRICT_ENV):
        pytest.fail(f"{reason} ({STRICT_ENV} is set: CI must not skip this)")
    pytest.skip(reason)


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder` while the block runs (as root); skips where mounting is not allowed."""
    folder.mkdir(exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                           text=True, check=False) if shutil.which("mount") else None
    if mount is None or mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mount.stderr.strip() if mount else 'no mount command'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def fill_disk(folder: Path) -> None:
    """Write zeros into `folder` until its disk is full: a real ENOSPC for whatever writes there next."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


@pytest.fixture(scope="session", autouse=True)
def away_from_the_checkout(tmp_path_factory) -> Iterator[None]:
    """The session runs in a scratch folder: a command given no --storage or --tracking-uri writes its default
    ./regsearch.journal and ./mlflow.db there, never into the checkout."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test inside an empty folder (default storage and tracking files land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def cifar_sample() -> Path:
    """The real CIFAR-10 sample (5,000 train, 1,000 test) in the official binary layout."""
    require(SHARED_CIFAR.is_file(), f"the shared CIFAR-10 sample is not at {SHARED_CIFAR}")
    return SHARED_CIFAR


@pytest.fixture(scope="session")
def hymenoptera(tmp_path_factory) -> Path:
    """The shared sample of 100 real photographs of ants and bees (train/ and val/, a folder per class), extracted."""
    import tarfile

    require(SHARED_HYMENOPTERA.is_file(), f"the shared hymenoptera sample is not at {SHARED_HYMENOPTERA}")
    root = tmp_path_factory.mktemp("hymenoptera")
    with tarfile.open(SHARED_HYMENOPTERA) as tar:
        tar.extractall(root, filter="data")
    return root / "hymenoptera"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (one uvicorn worker), stopped by its process group at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not answer /health within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its tables made (its migrations take seconds; tests copy it)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-store")
    cwd = os.getcwd()
    os.chdir(folder)  # the default experiment's artifact folder is relative to where the store is made
    try:
        MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    finally:
        os.chdir(cwd)
    return folder / "mlflow.db"


@pytest.fixture
def restore_logging():
    """The CLI points the `regsearch` logger at CliRunner's (soon closed) stderr; put it back afterwards."""
    import logging

    import optuna

    log = logging.getLogger("regsearch")
    saved = (log.handlers[:], log.level, log.propagate, optuna.logging.get_verbosity())
    yield
    log.handlers[:], log.level, log.propagate = saved[:3]
    optuna.logging.set_verbosity(saved[3])
