"""Faults lose nothing: a tracking server killed mid-study, SIGINT/SIGTERM mid-trial, unwritable or full stores.

The Optuna storage is the truth; MLflow catches up from it (`regsearch sync`, and automatically when a study
starts, when the tracking server answers again, and when a study ends after an outage). Real `regsearch`
processes and a real `mlflow server` (this file's own, so that it can be killed and started again) are used
where the behaviour depends on them. A small file plugin, `gate`, holds a trial at the start of its second
epoch while a file exists, so that a fault lands inside a trial on cue instead of by timing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

import regsearch
from regsearch._storage import open_storage
from regsearch.cli import cli
from tests.conftest import fill_disk, free_port, small_tmpfs, without_dac

REGSEARCH = os.path.join(os.path.dirname(sys.executable), "regsearch")
MLFLOW = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
COMPLETE, PRUNED, FAIL, RUNNING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                   optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING)
END_STATUS = {COMPLETE: "FINISHED", PRUNED: "KILLED", FAIL: "FAILED"}

GATE_PLUGIN = '''\
import faulthandler
import os
import signal
import time

import regsearch

faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that times out asks where the process hangs


@regsearch.register("gate")
class Gate(regsearch.Regularizer):
    """Holds a trial at the start of epoch 2 while the file `path` exists (writes PATH.held = trial number)."""

    def __init__(self, path=""):
        self.path = path

    def search_space(self, trial):
        return {}

    def on_epoch_start(self, state, params):
        if state.epoch != 2 or not os.path.exists(self.path):
            return
        with open(self.path + ".held", "w") as f:
            f.write(str(self.context.trial_number))
        while os.path.exists(self.path):
            time.sleep(0.05)
'''


# --------------------------------------------------------------------------------------------------------------
# helpers


def wait_for(what: str, condition: Callable[[], Any], timeout: float, proc: subprocess.Popen | None = None) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` (and the process's output)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"regsearch exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def communicate_or_show_stacks(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """`proc.communicate`; a process still running after `timeout` fails the test with its threads' stacks."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # the gate plugin's faulthandler writes every thread's stack to stderr
        time.sleep(2)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"still running {timeout:.0f} s after the signal; its stacks:\n{err[-6000:]}")


def trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as another process sees them (empty while the study does not exist yet)."""
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=False)
    except (KeyError, ValueError):
        return []


def finished(storage: str, name: str) -> int:
    return sum(t.state in (COMPLETE, PRUNED) for t in trials(storage, name))


def held_trial(hold: Path) -> int | None:
    marker = Path(f"{hold}.held")
    text = marker.read_text() if marker.exists() else ""
    return int(text) if text.strip() else None


def hold_next_trial(hold: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> int:
    """Make the next trial (or the running one, before its epoch 2) stop at epoch 2; returns its number."""
    Path(f"{hold}.held").unlink(missing_ok=True)
    hold.touch()
    wait_for("a trial held at epoch 2", lambda: held_trial(hold) is not None, timeout, proc)
    return held_trial(hold)


def trial_runs(client: MlflowClient, name: str) -> tuple[Any, dict[int, list]]:
    """The study run and the trial runs (by trial number) of experiment `name`."""
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("regsearch.role") == "study"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    by_number: dict[int, list] = {}
    for run in runs:
        if run.data.tags.get("regsearch.role") != "study":
            assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            by_number.setdefault(int(run.data.tags["trial_number"]), []).append(run)
    return parents[0], by_number


def assert_every_trial_has_its_run(client: MlflowClient, study: optuna.Study) -> dict[int, Any]:
    """One ended run per trial that trained, with the trial's params, its val_acc per epoch and its real state."""
    _, runs = trial_runs(client, study.study_name)
    logged = [t for t in study.trials if t.state != RUNNING]
    assert sorted(runs) == [t.number for t in logged], "expected one MLflow run per finished trial"
    assert all(len(r) == 1 for r in runs.values()), {n: len(r) for n, r in runs.items() if len(r) > 1}
    for t in logged:
        run, where = runs[t.number][0], f"trial {t.number} ({t.state.name})"
        assert run.info.status != "RUNNING", where
        state = "FAIL" if t.state == FAIL else t.state.name
        assert run.data.tags["regsearch.state"] == state, where
        if t.state != FAIL:
            assert run.info.status == END_STATUS[t.state], where
        for key, value in t.params.items():
            assert run.data.params[key] == str(value), f"{where}: param {key}"
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
        if run.data.tags.get("regsearch.synced") != "ended":  # a run cut off midway keeps what it had
            assert history == pytest.approx(t.intermediate_values, abs=1e-12), f"{where}: val_acc per epoch"
    return {n: r[0] for n, r in runs.items()}


class MlflowServer:
    """A real `mlflow server` (one worker) on a fixed port and store, which a test can kill and start again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.root)

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for("mlflow server answering /health", healthy, timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server's whole process group (uvicorn and its children) and wait until it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture
def mlflow_server_to_kill(tmp_path):
    server = MlflowServer(tmp_path)
    try:
        yield server
    finally:
        server.kill()






def gated_command(tmp: Path, name: str, tracking: str, n_trials: int, epochs: int) -> list[str]:
    (tmp / "gate.py").write_text(GATE_PLUGIN)
    return [REGSEARCH, "optimize", "--study", "digits", "--study-name", name, "--storage", str(tmp / "s.journal"),
            "--tracking-uri", tracking, "--n-trials", str(n_trials), "--device", "cpu",
            "--set", f"training.epochs={epochs}", "--set", "search.pruner.name=none", "--set", "search.baseline=false",
            "--plugin", str(tmp / "gate.py"), "--set", f"regularizers.gate={{path: {tmp / 'hold'}, enabled: true}}"]


# --------------------------------------------------------------------------------------------------------------
# the MLflow tracking server dies mid-study


@pytest.mark.slow
def test_a_killed_tracking_server_costs_no_trial_and_mlflow_catches_up(tmp_path, mlflow_server_to_kill):
    server = mlflow_server_to_kill
    server.start()
    name, storage, hold = "outage", str(tmp_path / "s.journal"), tmp_path / "hold"
    command = gated_command(tmp_path, name, server.url, n_trials=14, epochs=4)
    with open(tmp_path / "out.log", "wb") as out, open(tmp_path / "err.log", "wb") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=tmp_path)
    try:
        wait_for("2 trials finished", lambda: finished(storage, name) >= 2, 120, proc)
        cut = hold_next_trial(hold, proc)  # its run is open in MLflow when the server dies
        client = MlflowClient(tracking_uri=server.url)
        wait_for("the held trial's run in MLflow", lambda: cut in trial_runs(client, name)[1], 30, proc)
        server.kill()
        killed_at = time.monotonic()
        hold.unlink()
        # the cut-off trial and two more finish with the server dead: a dead server does not stall trials
        wait_for("3 trials finished after the kill", lambda: finished(storage, name) >= cut + 3, 60, proc)
        assert time.monotonic() - killed_at < 45, "a dead tracking server stalled the study"
        during = hold_next_trial(hold, proc)  # a trial that starts with the server dead
        server.start()
        # the study notices on its own (a probe every few seconds) and logs what finished meanwhile
        wait_for("the study seeing the server again", lambda: ") is back; " in (tmp_path / "err.log").read_text(),
                 60, proc)
        hold.unlink()
        proc.wait(timeout=180)
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    errors = (tmp_path / "err.log").read_text()
    assert proc.returncode == 0, errors[-3000:]
    assert ") does not answer (" in errors and ") is back; " in errors, errors[-3000:]
    assert "Traceback" not in errors

    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    assert [t.state for t in study.trials] == [COMPLETE] * 14, "every trial is in the Optuna storage"
    runs = assert_every_trial_has_its_run(client, study)
    synced = sorted(n for n, r in runs.items() if r.data.tags.get("regsearch.synced") == "true")
    assert synced == list(range(cut + 1, during + 1)), (synced, errors)  # they started while the server was dead
    # trials start fast: leave room for some to run after the server is back, whatever the timing
    assert during < 13 and all("regsearch.synced" not in runs[n].data.tags for n in range(during + 1, 14))
    for number in synced:
        run, trial = runs[number], study.trials[number]
        assert run.info.run_name == f"trial-{number}"
        assert run.data.params["seed"] == str(trial.user_attrs["seed"])
        assert run.data.metrics["gap_acc"] == pytest.approx(trial.user_attrs["metrics"]["gap_acc"], abs=1e-12)
        assert run.info.start_time == int(trial.datetime_start.timestamp() * 1000)
    cut_run = runs[cut]
    assert cut_run.data.tags.get("regsearch.synced") in ("ended", None), "the cut-off run was made twice"
    assert cut_run.info.status == "FINISHED"
    parent, _ = trial_runs(client, name)
    assert parent.info.status == "FINISHED"

    # everything is there already: `regsearch sync` adds nothing
    again = subprocess.run([REGSEARCH, "sync", "--study", name, "--storage", storage, "--tracking-uri", server.url],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == (f"study {name}: logged 0 runs from the Optuna storage, ended 0 runs left RUNNING, "
                            f"14 already there\n")
    assert len(trial_runs(client, name)[1]) == 14


# --------------------------------------------------------------------------------------------------------------
# runs missing from MLflow, logged from the storage


def sync_spec() -> Any:
    """A tiny digits study whose enqueued first trial diverges and whose median pruner prunes some trials."""
    return regsearch.spec_from_dict({
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"epochs": 4, "lr": [0.01, 0.3], "schedule": "constant"},
        "search": {"pruner": {"name": "median", "n_startup_trials": 0, "n_warmup_steps": 0},
                   "first_trial": {"lr": 1.0e30}},
        "regularizers": {"dropout": {}, "l2": {}}}, name="synced")


@pytest.mark.filterwarnings("ignore:Fixed parameter lr with value 1e\\+30 is out of range")
def test_trials_run_without_mlflow_are_logged_once_from_the_storage(tmp_path, monkeypatch, mlflow_store,
                                                                     restore_logging):
    monkeypatch.chdir(tmp_path)
    shutil.copy(mlflow_store, tmp_path / "mlflow.db")
    tracking, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "s.journal")
    spec = sync_spec()
    where = dict(storage=storage, device="cpu")
    client = MlflowClient(tracking_uri=tracking)

    # trials run while MLflow was out of reach (here: tracking off) are logged when the study next starts
    regsearch.optimize(spec, n_trials=4, tracking=False, **where)
    regsearch.optimize(spec, n_trials=6, tracking_uri=tracking, **where)
    study = optuna.load_study(study_name="synced", storage=open_storage(storage))
    runs = assert_every_trial_has_its_run(client, study)
    offline = [t for t in study.trials if t.number <= 4]
    assert {t.state for t in offline} == {FAIL, COMPLETE, PRUNED}, [t.state.name for t in offline]
    for trial in offline:
        run, number = runs[trial.number], trial.number
        assert run.data.tags["regsearch.synced"] == "true", number
        assert run.data.tags["regsearch.study"] == "synced" and run.info.run_name == f"trial-{number}"
        assert run.data.params["seed"] == str(trial.user_attrs["seed"])
        assert run.data.params["precision"] == trial.user_attrs["precision"]
        assert run.info.start_time == int(trial.datetime_start.timestamp() * 1000)
        assert run.info.end_time == int(trial.datetime_complete.timestamp() * 1000)
        for key, value in trial.user_attrs.get("metrics", {}).items():
            assert run.data.metrics[key] == pytest.approx(value, abs=1e-12), f"trial {number}: {key}"
        if trial.state == PRUNED:
            assert run.data.tags["regsearch.reason"] == (f"pruned at epoch {trial.user_attrs['epochs']} "
                                                         f"(val_acc {trial.user_attrs['metrics']['val_acc']:.4f})")
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["regsearch.reason"] == "loss is NaN/inf at epoch 1"
    assert all("regsearch.synced" not in runs[n].data.tags for n in (5, 6)), "logged live, not synced"

    # `regsearch sync`: the runs of two more offline trials, and a run cut off midway (its process lost the
    # server before ending it) is ended with the trial's state and keeps what it had
    regsearch.optimize(spec, n_trials=8, tracking=False, **where)
    cut = runs[6].info.run_id
    client.set_tag(cut, "regsearch.state", "RUNNING")
    client.update_run(cut, status="RUNNING")
    args = ["sync", "--study", "synced", "--storage", storage, "--tracking-uri", tracking]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    study = optuna.load_study(study_name="synced", storage=open_storage(storage))
    assert first.stdout == ("study synced: logged 2 runs from the Optuna storage (trials 7, 8), ended 1 run left "
                            "RUNNING (trial 6), 6 already there\n")
    runs = assert_every_trial_has_its_run(client, study)
    assert runs[6].data.tags["regsearch.synced"] == "ended"
    assert runs[6].data.tags["regsearch.state"] == study.trials[6].state.name

    # idempotent: nothing new the second time
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert second.stdout == ("study synced: logged 0 runs from the Optuna storage, ended 0 runs left RUNNING, "
                             "9 already there\n")
    assert len(trial_runs(client, "synced")[1]) == len(study.trials) == 9


def test_a_trial_killed_mid_way_keeps_the_epochs_it_finished(tmp_path):
    """SIGKILL while a trial waits at the start of epoch 2: its epoch 1 is in the storage, read as its curve."""
    from regsearch._records import trial_curve

    storage, hold = str(tmp_path / "s.journal"), tmp_path / "hold"
    command = gated_command(tmp_path, "killed", f"sqlite:///{tmp_path / 'mlflow.db'}", n_trials=1, epochs=3)
    hold.touch()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        number = hold_next_trial(hold, proc, timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    trial = {t.number: t for t in trials(storage, "killed")}[number]
    assert trial.state == RUNNING  # its worker died: nothing ended it
    curve = trial_curve(trial)
    assert [row["epoch"] for row in curve] == [1]
    assert curve[0]["val_acc"] == pytest.approx(trial.intermediate_values[1], abs=1e-6)


# --------------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM mid-trial


@pytest.mark.slow
def test_sigint_and_sigterm_fail_the_running_trial_and_rerunning_resumes(tmp_path, mlflow_store):
    shutil.copy(mlflow_store, tmp_path / "mlflow.db")
    tracking, storage, hold = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "s.journal"), tmp_path / "hold"
    command = gated_command(tmp_path, "signals", tracking, n_trials=2, epochs=3)
    client = MlflowClient(tracking_uri=tracking)

    hold.touch()
    for sig, code, said in ((signal.SIGINT, 130, "interrupted; "), (signal.SIGTERM, 143, "interrupted by SIGTERM; ")):
        # SIGINT as a terminal delivers it: a suite started in the background (`pytest &`) passes SIGINT ignored
        # to its children, and Python then installs no KeyboardInterrupt handler
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            number = hold_next_trial(hold, proc, timeout=120)
            proc.send_signal(sig)
            sent = time.monotonic()
            out, err = communicate_or_show_stacks(proc, timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert time.monotonic() - sent < 20, "the process did not stop within seconds"
        assert proc.returncode == code, err
        assert f"Error: {said}rerun the same command to resume" in err, err
        assert "Traceback" not in err
        stored = {t.number: t for t in trials(storage, "signals")}
        assert stored[number].state == FAIL and stored[number].user_attrs["fail_reason"] == "interrupted"
        assert not [t.number for t in stored.values() if t.state == RUNNING]
        _, runs = trial_runs(client, "signals")
        run = runs[number][0]
        assert run.info.status == "KILLED" and run.info.end_time is not None, signal.Signals(sig).name
        assert run.data.tags["regsearch.state"] == "FAIL" and run.data.tags["regsearch.reason"] == "interrupted"

    hold.unlink()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "study signals: 2 complete" in done.stdout
    study = optuna.load_study(study_name="signals", storage=open_storage(storage))
    assert [t.state for t in study.trials] == [FAIL, FAIL, COMPLETE, COMPLETE]
    parent, runs = trial_runs(client, "signals")
    assert parent.info.status == "FINISHED"
    assert sorted(runs) == [0, 1, 2, 3] and all(r[0].info.status != "RUNNING" for r in runs.values())


# --------------------------------------------------------------------------------------------------------------
# unwritable, missing or full storage and tracking locations


def run_without_dac(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The real executable with file permissions in force even for root (tests often run as root)."""
    command = without_dac([REGSEARCH, *args])
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """A folder on a 64 KiB tmpfs filled to the last byte (a real ENOSPC); skips where mounting is not allowed."""
    with small_tmpfs(tmp_path_factory.mktemp("full-disk"), "64k") as folder:
        fill_disk(folder)
        yield folder


LOCATION_CASES = [
    # (id, extra arguments, what the one line says)
    ("storage-read-only-folder", ["--storage", "{ro}/s.journal"],
     "--storage {ro}/s.journal: cannot write to folder {ro}"),
    ("storage-sqlite-read-only-folder", ["--storage", "sqlite:///{ro}/s.db"],
     "--storage sqlite:///{ro}/s.db: cannot open the database: cannot write to folder {ro}"),
    ("storage-sqlite-missing-folder", ["--storage", "sqlite:///{tmp}/no/s.db"],
     "--storage sqlite:///{tmp}/no/s.db: cannot open the database: folder {tmp}/no does not exist"),
    ("storage-dev-full", ["--storage", "/dev/full"], "--storage /dev/full: /dev/full is not a regular file"),
    ("storage-sqlite-dev-full", ["--storage", "sqlite:////dev/full"],
     "--storage sqlite:////dev/full: cannot open the database: /dev/full is not a regular file"),
    ("storage-full-disk", ["--storage", "{full}/s.journal"],
     "--storage {full}/s.journal: no space left on the disk holding {full} (0 KiB free)"),
    ("tracking-sqlite-read-only-folder", ["--tracking-uri", "sqlite:///{ro}/m.db"],
     "--tracking-uri sqlite:///{ro}/m.db: cannot use the MLflow tracking store: cannot write to folder {ro}"),
    ("tracking-sqlite-missing-folder", ["--tracking-uri", "sqlite:///{tmp}/no/m.db"],
     "--tracking-uri sqlite:///{tmp}/no/m.db: cannot use the MLflow tracking store: folder {tmp}/no does not exist"),
    ("tracking-file-read-only-folder", ["--tracking-uri", "file://{ro}/mlruns"],
     "--tracking-uri file://{ro}/mlruns: cannot use the MLflow tracking store: cannot write to folder {ro}"),
    ("tracking-file-missing-folder", ["--tracking-uri", "file://{tmp}/no/mlruns"],
     "--tracking-uri file://{tmp}/no/mlruns: cannot use the MLflow tracking store: folder {tmp}/no does not exist"),
    ("tracking-file-store-refused", ["--tracking-uri", "file://{tmp}/mlruns"],
     "--tracking-uri file://{tmp}/mlruns: cannot use the MLflow tracking store: MLflow 3 takes a file store only "
     "with MLFLOW_ALLOW_FILE_STORE=true; use a database such as sqlite:///{tmp}/mlflow.db"),
    ("tracking-sqlite-dev-full", ["--tracking-uri", "sqlite:////dev/full"],
     "--tracking-uri sqlite:////dev/full: cannot use the MLflow tracking store: /dev/full is not a regular file"),
    ("tracking-sqlite-full-disk", ["--tracking-uri", "sqlite:///{full}/m.db"],
     "--tracking-uri sqlite:///{full}/m.db: cannot use the MLflow tracking store: no space left on the disk "
     "holding {full} (0 KiB free)"),
]


@pytest.mark.parametrize("case", LOCATION_CASES, ids=[c[0] for c in LOCATION_CASES])
def test_an_unusable_store_location_is_one_line_and_exit_2_before_training(case, tmp_path, request):
    name, extra, message = case
    places = {"tmp": str(tmp_path), "ro": str(tmp_path / "ro")}
    if "{full}" in message:
        places["full"] = str(request.getfixturevalue("full_disk"))
    (tmp_path / "ro").mkdir(mode=0o555)
    args = ["optimize", "--study", "digits", "--n-trials", "1", "--set", "training.epochs=1",
            *(a.format(**places) for a in extra)]
    devices = sorted(os.listdir("/dev"))
    started = time.monotonic()
    done = run_without_dac(args, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert time.monotonic() - started < 20, "the location was not checked up front"
    lines = done.stderr.strip().splitlines()
    assert lines == [f"Error: {message.format(**places)}"], done.stderr
    assert done.stdout == ""
    # nothing trained, nothing stored: no study, no MLflow store, no stray file next to /dev/full
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"]
    assert list((tmp_path / "ro").iterdir()) == []
    assert sorted(os.listdir("/dev")) == devices


def test_the_python_api_refuses_a_device_as_storage_or_tracking_store(tmp_path, monkeypatch):
    """Without the CLI's up-front check: /dev/full as a journal would be read forever (it reads as zeros)."""
    from regsearch._errors import RegsearchError

    monkeypatch.chdir(tmp_path)
    spec = regsearch.spec_from_dict({"model": {"name": "mlp", "hidden": [8]}, "training": {"epochs": 1}}, name="api")
    for kwargs, message in (
            (dict(storage="/dev/full", tracking=False), "--storage /dev/full: /dev/full is not a regular file"),
            (dict(storage=str(tmp_path / "s.journal"), tracking_uri="sqlite:////dev/full"),
             "--tracking-uri sqlite:////dev/full: cannot use the MLflow tracking store: /dev/full is not a regular "
             "file"),
            (dict(storage=str(tmp_path / "s.journal"), tracking_uri=f"sqlite:///{tmp_path}/no/m.db"),
             f"folder {tmp_path}/no does not exist")):
        with pytest.raises(RegsearchError, match=re.escape(message)) as caught:
            regsearch.optimize(spec, n_trials=1, device="cpu", **kwargs)
        assert caught.value.exit_code == 2
    assert trials(str(tmp_path / "s.journal"), "api") == [], "a trial ran"
    assert not (tmp_path / "no").exists()


def test_sync_names_an_unknown_study_and_an_unusable_tracking_store(tmp_path, restore_logging):
    storage = str(tmp_path / "s.journal")
    optuna.create_study(study_name="stored", storage=open_storage(storage), direction="maximize")
    runner = CliRunner()
    result = runner.invoke(cli, ["sync", "--study", "stord", "--storage", storage])
    assert result.exit_code == 2
    assert "unknown study" in result.stderr and "did you mean 'stored'" in result.stderr, result.stderr
    result = runner.invoke(cli, ["sync", "--study", "stored", "--storage", storage, "--tracking-uri",
                                 f"sqlite:///{tmp_path}/no/m.db"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"Error: --tracking-uri sqlite:///{tmp_path}/no/m.db: cannot use the MLflow "
                                     f"tracking store: folder {tmp_path}/no does not exist")


def test_a_run_its_worker_ended_just_before_dying_is_ended_as_the_storage_says(mlflow_server, tmp_path):
    """A worker can send its trial's end to MLflow and die before Optuna hears of it: the storage fails the
    trial and queues it again, so its MLflow run must not stay FINISHED beside the retry's."""
    import uuid

    from regsearch.tracking._client import Tracker

    study = optuna.create_study(study_name="dead", storage=open_storage(str(tmp_path / "s.journal")))
    tracker = Tracker.open(mlflow_server, f"dead_{uuid.uuid4().hex[:8]}")
    try:
        parent = tracker.parent_run(study, "dead", {}, sync=False)
        run_id = tracker.start_trial(parent, 0, "dead")
        tracker.end_trial(run_id, "FINISHED", {"regsearch.state": "COMPLETE"})  # the worker's last message
        died = {"regsearch.state": "FAIL", "regsearch.reason": "worker pid 4242 died"}
        tracker.end_dead_trial(None, 0, "KILLED", died)  # the recovering worker knows only the trial number
        run = tracker.client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert {k: run.data.tags[k] for k in died} == died
        ended = run.info.end_time
        tracker.end_dead_trial(run_id, 0, "KILLED", died)  # a second recovering worker changes nothing
        assert tracker.client.get_run(run_id).info.end_time == ended
    finally:
        tracker.close()


# --------------------------------------------------------------------------------------------------------------
# a new sqlite tracking store opened by several processes at once, and one a migration left half done

OPEN_STORE = '''\
import sys, time
from pathlib import Path

from regsearch.tracking._client import Tracker

uri, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
try:
    tracker = Tracker.open(uri, "race")
    run = tracker.client.create_run(tracker.experiment_id, run_name=ready.name)
    tracker.client.log_metric(run.info.run_id, "x", 1.0)
    tracker.close()
except Exception as exc:
    print("failed:", str(exc).splitlines()[0])
    sys.exit(1)
'''


@pytest.mark.slow
def test_three_processes_opening_a_new_sqlite_store_at_once_all_log_to_it(tmp_path):
    """MLflow migrates a new store without a lock: unguarded, 3 of 3 rounds here left a process failed."""
    script = tmp_path / "open_store.py"
    script.write_text(OPEN_STORE)
    env = {**os.environ, "PYTHONPATH": str(Path(regsearch.__file__).resolve().parent.parent)}
    for attempt in range(3):
        folder = tmp_path / f"round{attempt}"
        folder.mkdir()
        uri, go = f"sqlite:///{folder / 'mlflow.db'}", folder / "go"
        procs = [subprocess.Popen([sys.executable, str(script), uri, str(folder / f"p{i}"), str(go)], cwd=folder,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(3)]
        wait_for("three processes ready", lambda ready=folder: all((ready / f"p{i}").exists() for i in range(3)), 120)
        go.touch()  # MLflow is imported in all three: they open the store within milliseconds of each other
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        failed = [line for out in outputs for line in out.splitlines() if line.startswith("failed:")]
        assert not failed and all(p.returncode == 0 for p in procs), f"round {attempt}: {failed or outputs}"
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["p0", "p1", "p2"], f"round {attempt}"
        assert all(r.data.metrics == {"x": 1.0} for r in runs), f"round {attempt}"


def half_migrated_store(path: Path) -> None:
    """A sqlite MLflow store as a migration killed midway leaves it (seen with kill -9 here): the revision before
    7ac759974ad8 (which alters `tags` by copying it), and the copy `_alembic_tmp_tags` next to the intact `tags`."""
    import sqlite3

    from alembic import command
    from mlflow.store.db.utils import InitialBase, _get_alembic_config, create_sqlalchemy_engine

    url = f"sqlite:///{path}"
    engine = create_sqlalchemy_engine(url)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "df50e92ffc5e")
    engine.dispose()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE _alembic_tmp_tags AS SELECT * FROM tags WHERE 0")


def test_a_store_a_migration_left_half_done_is_repaired_and_the_study_logs_to_it(tmp_path, restore_logging, capfd):
    import sqlite3

    store = tmp_path / "mlflow.db"
    half_migrated_store(store)
    tracking, storage = f"sqlite:///{store}", str(tmp_path / "s.journal")
    spec = regsearch.spec_from_dict({"model": {"name": "mlp", "hidden": [16]}, "training": {"epochs": 2},
                                     "search": {"pruner": {"name": "none"}}, "regularizers": {"l2": {}}},
                                    name="repaired")
    study = regsearch.optimize(spec, n_trials=2, storage=storage, tracking_uri=tracking, device="cpu")
    assert (f"MLflow ({tracking}): a migration of the store had stopped midway; dropped the leftover table "
            "_alembic_tmp_tags and migrated it again") in capfd.readouterr().err
    assert_every_trial_has_its_run(MlflowClient(tracking_uri=tracking), study)
    with sqlite3.connect(store) as db:
        assert not db.execute("SELECT name FROM sqlite_master WHERE name LIKE '\\_alembic\\_tmp%' ESCAPE '\\'"
                              ).fetchall()

    # a copy whose table is gone holds the only data: refused in one line, nothing dropped
    other = tmp_path / "other.db"
    half_migrated_store(other)
    with sqlite3.connect(other) as db:
        db.execute("DROP TABLE tags")
    result = CliRunner().invoke(cli, ["sync", "--study", "repaired", "--storage", storage, "--tracking-uri",
                                      f"sqlite:///{other}"])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"Error: --tracking-uri sqlite:///{other}: cannot use the MLflow tracking store: {other}: "
                             "an MLflow migration stopped midway and left table _alembic_tmp_tags as the only copy "
                             "of table tags; restore the file from a backup, or move it aside to start a new "
                             "store\n")


# --------------------------------------------------------------------------------------------------------------
# the disk holding the tracking store fills during a study

FILLS_THE_DISK = """\
data: {name: digits}
model: {name: mlp, hidden: [16]}
training: {epochs: 20, schedule: constant}
search: {pruner: {name: none}}
regularizers: {l2: {}}
"""


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 1100 KiB tmpfs: room for a new MLflow store (932 KiB) and a few trials' runs, no more."""
    with small_tmpfs(tmp_path / "small", "1100k") as folder:
        yield folder


@pytest.mark.slow
def test_a_tracking_disk_that_fills_costs_one_warning_and_the_count_of_missing_runs(tmp_path, small_disk):
    (tmp_path / "fills.yaml").write_text(FILLS_THE_DISK)
    storage, tracking = str(tmp_path / "s.journal"), f"sqlite:///{small_disk / 'mlflow.db'}"
    done = subprocess.run([REGSEARCH, "optimize", "--study", "fills.yaml", "--n-trials", "12", "--storage", storage,
                           "--tracking-uri", tracking, "--device", "cpu"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="fills", storage=open_storage(storage))
    assert sum(t.state == COMPLETE for t in study.trials) == 12, "the Optuna storage keeps every trial"

    errors = done.stderr
    assert "Traceback" not in errors and "sqlalchemy" not in errors.lower(), errors[-3000:]
    assert errors.count(f"MLflow ({tracking})") == 1, errors[-3000:]  # the one warning, not repeated
    assert f"MLflow ({tracking}): no space left on the disk holding the tracking store (" in errors
    counted = re.search(r"(\d+) trials? (?:is|are) not in MLflow \(no run, or one left RUNNING\); `([^`]+)` logs "
                        r"them from the Optuna storage once the tracking store takes them", errors)
    assert counted, errors[-3000:]

    # what the count says is what MLflow lacks; every run the store holds is ended
    client = MlflowClient(tracking_uri=tracking)
    _, runs = trial_runs(client, "fills")
    assert all(r.info.status != "RUNNING" for rs in runs.values() for r in rs), "a run was left RUNNING"
    assert int(counted.group(1)) == 12 - len(runs) > 0

    # with room again, the command the line gives logs them
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    command = counted.group(2).split()
    assert command[:2] == ["regsearch", "sync"]
    synced = subprocess.run([REGSEARCH, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            check=False)
    assert synced.returncode == 0, synced.stderr
    assert_every_trial_has_its_run(client, study)


# --------------------------------------------------------------------------------------------------------------
# a sync killed midway

from tests.test_workers import postgres_url  # noqa: E402,F401  (a fixture)

HANGING_SYNC = '''\
import sys, time

import regsearch.tracking._sync as sync
from regsearch._sync_study import sync_study

storage, tracking, name = sys.argv[1:]
log_trial = sync._log_trial


def log_then_hang(*args):
    log_trial(*args)
    print("logged", flush=True)
    time.sleep(600)


sync._log_trial = log_then_hang
sync_study(name, storage=storage, tracking_uri=tracking)
'''


@pytest.mark.parametrize("backend", ["journal", "postgres"])
def test_a_sync_killed_midway_leaves_nothing_behind_and_the_next_one_proceeds(backend, tmp_path, mlflow_store,
                                                                               request):
    """The sync lock is the database's or the file system's, not a record in the study's storage: a sync killed
    while it holds the lock leaves no trace there, and the next sync does not wait for it."""
    storage = str(tmp_path / "s.journal") if backend == "journal" else request.getfixturevalue("postgres_url")
    shutil.copy(mlflow_store, tmp_path / "mlflow.db")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = optuna.create_study(study_name="killed", storage=open_storage(storage))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    proc = subprocess.Popen([sys.executable, "-c", HANGING_SYNC, storage, tracking, "killed"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "logged\n", proc.stderr.read()[-2000:] if proc.poll() is not None else ""
    finally:
        proc.kill()
        proc.wait()
    assert optuna.get_all_study_names(open_storage(storage)) == ["killed"], "the sync left a record in the storage"
    result = CliRunner().invoke(cli, ["sync", "--study", "killed", "--storage", storage, "--tracking-uri", tracking])
    assert result.exit_code == 0, result.output
    assert result.stdout == ("study killed: logged 2 runs from the Optuna storage (trials 1, 2), ended 0 runs left "
                             "RUNNING, 1 already there\n")
