"""Several workers on one study: exact totals, no duplicates, and nothing lost when a worker is killed.

The same two scenarios run on PostgreSQL (separate `regsearch optimize` processes, as on several machines)
and on the default local journal file (`--workers 3`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import optuna
import pytest
from mlflow import MlflowClient

from regsearch._storage import open_storage
from tests.conftest import require

pytestmark = pytest.mark.slow

COMPLETE, FAIL, RUNNING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                           optuna.trial.TrialState.RUNNING)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REGSEARCH = os.path.join(os.path.dirname(sys.executable), "regsearch")


def study_args(name: str, storage: str, tracking: str, epochs: int) -> list[str]:
    return ["optimize", "--study", "digits", "--study-name", name, "--n-trials", "12", "--storage", storage,
            "--tracking-uri", tracking, "--device", "cpu", "--set", f"training.epochs={epochs}",
            "--set", "search.pruner.name=none", "--set", "search.heartbeat_interval=2",
            "--set", "search.grace_period=15"]


@pytest.fixture
def postgres_url():
    """A fresh database on the local PostgreSQL server, dropped after the test."""
    try:
        import psycopg
    except ImportError:
        require(False, "psycopg is not installed (pip install 'regsearch[test]')")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        require(False, f"no PostgreSQL server at 127.0.0.1:5432 ({str(exc).splitlines()[0]})")
    name = f"regsearch_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def children(tracking: str, name: str) -> tuple[set[str], list]:
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.info.run_id for r in runs if r.data.tags.get("regsearch.role") == "study"}
    return parents, [r for r in runs if "trial_number" in r.data.tags]


def assert_exact_study(study: optuna.Study, tracking: str, name: str) -> None:
    # the user's storage holds the user's study, nothing regsearch made to coordinate its processes
    assert optuna.get_all_study_names(study._storage) == [name]
    complete = study.get_trials(states=(COMPLETE,))
    assert len(complete) == 12
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert not study.get_trials(states=(RUNNING,))
    parents, runs = children(tracking, name)
    assert len(parents) == 1
    parent = parents.pop()
    assert study.user_attrs["mlflow_parent_run_id"] == parent
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["trial_number"]) for r in finished) == sorted(t.number for t in complete)
    assert not [r for r in runs if r.info.status == "RUNNING"]


def kill_a_worker_mid_trial(storage: str, name: str, pids: set[int] | None, deadline_s: float = 120,
                            spare: int | None = None) -> int:
    """SIGKILL the worker running a trial (one of `pids`, or any worker but `spare`) after its trial has
    started; returns the killed trial's number."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            study = load(storage, name)
        except KeyError:
            time.sleep(0.2)
            continue
        done = len(study.get_trials(deepcopy=False, states=(COMPLETE,)))
        for t in study.get_trials(deepcopy=False, states=(RUNNING,)):
            pid = (t.user_attrs.get("worker") or {}).get("pid")
            if done >= 2 and pid and pid != spare and (pids is None or pid in pids) and t.intermediate_values:
                # frozen first: a trial that ended since the poll would make the kill hit the worker's next trial
                os.kill(pid, signal.SIGSTOP)
                if load(storage, name).trials[t.number].state == RUNNING:
                    os.kill(pid, signal.SIGKILL)
                    return t.number
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("no worker was caught in the middle of a trial")


def assert_killed_trial_recovered(study: optuna.Study, tracking: str, name: str, killed: int) -> None:
    failed = {t.number: t for t in study.get_trials(states=(FAIL,))}
    assert killed in failed, "the killed worker's trial must end FAIL, not stay RUNNING"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].params == failed[killed].params
    assert retried[0].state == COMPLETE
    _, runs = children(tracking, name)
    run = [r for r in runs if r.data.tags["trial_number"] == str(killed)]
    assert len(run) == 1 and run[0].info.status in ("FAILED", "KILLED")


def test_three_processes_on_postgres_share_one_study(postgres_url, mlflow_server, tmp_path):
    name = f"pg-{uuid.uuid4().hex[:6]}"
    procs = [subprocess.Popen([REGSEARCH, *study_args(name, postgres_url, mlflow_server, 4)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    assert_exact_study(load(postgres_url, name), mlflow_server, name)


def test_a_killed_worker_on_postgres_loses_nothing(postgres_url, mlflow_server, tmp_path):
    name = f"pgkill-{uuid.uuid4().hex[:6]}"
    procs = [subprocess.Popen([REGSEARCH, *study_args(name, postgres_url, mlflow_server, 15)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    killed = kill_a_worker_mid_trial(postgres_url, name, {p.pid for p in procs})
    outs = [p.communicate(timeout=400) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [-signal.SIGKILL, 0, 0], [o[1][-2000:] for o in outs]
    study = load(postgres_url, name)
    assert_exact_study(study, mlflow_server, name)
    assert_killed_trial_recovered(study, mlflow_server, name, killed)


def test_workers_3_on_the_default_local_storage(mlflow_server, tmp_path):
    name = f"local-{uuid.uuid4().hex[:6]}"
    args = [a for a in study_args(name, "x", mlflow_server, 4)]
    i = args.index("--storage")
    del args[i:i + 2]  # the default: ./regsearch.journal
    result = subprocess.run([REGSEARCH, *args, "--workers", "3"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "study " + name + ": 12 complete" in result.stdout
    assert_exact_study(load(str(tmp_path / "regsearch.journal"), name), mlflow_server, name)


def test_a_killed_local_worker_loses_nothing(mlflow_server, tmp_path):
    name = f"localkill-{uuid.uuid4().hex[:6]}"
    # trials long enough that the main process has not run them all by the time its workers are up (about 10 s
    # on two cores, each worker importing torch and starting its own tracking process)
    args = study_args(name, str(tmp_path / "regsearch.journal"), mlflow_server, 40)
    main = subprocess.Popen([REGSEARCH, *args, "--workers", "3"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # the main process runs trials too; kill one of the worker processes it started
    killed = kill_a_worker_mid_trial(str(tmp_path / "regsearch.journal"), name, None, spare=main.pid)
    out, err = main.communicate(timeout=400)
    assert main.returncode == 0, err[-2000:]
    study = load(str(tmp_path / "regsearch.journal"), name)
    assert_exact_study(study, mlflow_server, name)
    assert_killed_trial_recovered(study, mlflow_server, name, killed)
    assert Counter(t.state for t in study.trials)[FAIL] == 1


AGREE = """
import sys, time
import optuna
from regsearch._storage import open_storage
from regsearch.tracking import TrackerProcess

storage, name, tracking, at = sys.argv[1:]
study = optuna.load_study(study_name=name, storage=open_storage(storage))
tracker = TrackerProcess.start(tracking, name)
time.sleep(max(0.0, float(at) - time.time()))
tracker.parent_run(study, name, {}, storage=storage, ends_study=False)
print(tracker.parent_run_id())
tracker.close()
"""


@pytest.mark.parametrize("backend", ["journal", "postgres"])
def test_processes_opening_a_study_at_the_same_moment_agree_on_one_study_run(backend, mlflow_server, tmp_path,
                                                                              request):
    """Four processes (as on four machines) open the study run of a new study at once: one run, no extra study."""
    storage = str(tmp_path / "s.journal") if backend == "journal" else request.getfixturevalue("postgres_url")
    name = f"agree-{backend}-{uuid.uuid4().hex[:6]}"
    optuna.create_study(study_name=name, storage=open_storage(storage))
    # each spelling of the one storage a user may give (a relative journal path, a driver and a port)
    spellings = ([storage, "s.journal", "./s.journal", str(tmp_path / "." / "s.journal")] if backend == "journal"
                 else [storage, storage.replace("postgresql://", "postgresql+psycopg://"),
                       storage.replace("127.0.0.1", "localhost"), storage.replace(":5432", "")])
    at = time.time() + 30  # every process has started its tracking process by then, on two loaded cores
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, spelling, name, mlflow_server, str(at)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for spelling in spellings]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
    chosen = {o[0].strip() for o in outs}
    parents, _ = children(mlflow_server, name)
    assert len(chosen) == 1 and chosen == parents, (chosen, parents)
    study = load(storage, name)
    assert study.user_attrs["mlflow_parent_run_id"] in chosen
    assert optuna.get_all_study_names(study._storage) == [name]
