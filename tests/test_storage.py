"""The Optuna storage: read-only commands create nothing; a journal torn by a crash is cut back, not lost."""

from __future__ import annotations

import json
import logging
import threading
import time

import optuna
import pytest
from click.testing import CliRunner
from optuna.storages.journal import JournalFileSymlinkLock

import regsearch
from regsearch import StorageError
from regsearch._storage import open_storage
from regsearch.cli import cli
from tests.conftest import fill_disk, small_tmpfs

COMPLETE = optuna.trial.TrialState.COMPLETE


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def warnings_logged():
    """The warnings on the `regsearch` logger, whatever its handlers and propagation are at the time."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("regsearch")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


@pytest.mark.parametrize("command", ["show", "report", "sync"])
@pytest.mark.parametrize("storage", [None, "s.journal", "sqlite:///s.db"])
def test_a_read_only_command_without_the_study_says_what_to_do_and_creates_nothing(command, storage, in_tmp,
                                                                                   restore_logging):
    args = [command, "--study", "digits", *(["--storage", storage] if storage else [])]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    expected = in_tmp / (storage or "regsearch.journal").removeprefix("sqlite:///")
    assert lines[0].startswith("Error: ") and f"{expected} does not exist" in lines[0]
    assert "pass --storage" in lines[0] and "run from the study's folder" in lines[0]
    assert "known: none" not in lines[0]
    assert list(in_tmp.iterdir()) == [], "a read-only command left files behind"


def test_a_journal_torn_by_a_crash_loses_only_its_last_record(in_tmp, warnings_logged, restore_logging):
    journal = in_tmp / "s.journal"
    run = {"overrides": {"training.epochs": 2}, "tracking": False, "storage": str(journal)}
    first = regsearch.optimize("digits", n_trials=3, **run)
    kept = [(t.number, t.value) for t in first.get_trials(states=(COMPLETE,))]
    assert len(kept) == 3
    # what a crash or a full disk mid-write leaves: the last record without its end
    with open(journal, "r+b") as f:
        f.truncate(journal.stat().st_size - 37)
    torn = journal.read_bytes()
    assert warnings_logged == []

    resumed = regsearch.optimize("digits", n_trials=5, **run)

    finished = resumed.get_trials(states=(COMPLETE,))
    assert len(finished) == 5
    assert [(t.number, t.value) for t in finished[:3]] == kept
    torn_warnings = [r.getMessage() for r in warnings_logged if "torn" in r.getMessage()]
    assert len(torn_warnings) == 1, [r.getMessage() for r in warnings_logged]
    backups = list(in_tmp.glob("s.journal.torn-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == torn
    assert str(backups[0]) in torn_warnings[0]
    # nothing was appended to the torn line: every record reads as Optuna reads it
    lines = journal.read_bytes().splitlines(keepends=True)
    assert all(line.endswith(b"\n") and json.loads(line) for line in lines)

    shown = invoke("show", "--study", "digits", "--storage", str(journal))
    assert shown.exit_code == 0, shown.output
    assert "study digits: 5 complete" in shown.stdout
    assert len(list(in_tmp.glob("s.journal.torn-*"))) == 1


def test_an_append_in_flight_under_the_journal_lock_is_not_cut(tmp_path, warnings_logged):
    """Another worker writing its record holds the journal's lock; its half-written line is no torn record."""
    journal = tmp_path / "s.journal"
    optuna.create_study(study_name="busy", storage=open_storage(str(journal)))
    record = json.dumps({"op_code": 0, "worker_id": "w", "study_name": "other", "directions": [1]}) + "\n"
    whole = journal.read_bytes() + record.encode()
    lock = JournalFileSymlinkLock(str(journal))
    lock.acquire()
    with open(journal, "ab") as f:
        f.write(record[:20].encode())
    opened: list = []
    opener = threading.Thread(target=lambda: opened.append(open_storage(str(journal))))
    opener.start()
    time.sleep(0.5)
    assert opener.is_alive(), "the half-written record was not waited for"
    with open(journal, "ab") as f:
        f.write(record[20:].encode())
    lock.release()
    opener.join(timeout=30)
    assert journal.read_bytes() == whole
    assert sorted(optuna.get_all_study_names(opened[0])) == ["busy", "other"]
    assert warnings_logged == [] and list(tmp_path.glob("*.torn-*")) == []


def test_a_torn_journal_on_a_full_disk_is_left_as_it_is_with_one_clear_error(tmp_path):
    """The backup cannot be written, so nothing is cut; freeing space and rerunning repairs it then."""
    with small_tmpfs(tmp_path / "disk", "64k") as folder:
        journal = folder / "s.journal"
        optuna.create_study(study_name="full", storage=open_storage(str(journal)))
        with open(journal, "ab") as f:
            f.write(b'{"op_code": 0, "worker_id": "w", "study_na')
        torn = journal.read_bytes()
        fill_disk(folder)
        with pytest.raises(StorageError, match="last record is torn.*No space left"):
            open_storage(str(journal))
        assert journal.read_bytes() == torn
        assert sorted(p.name for p in folder.iterdir()) == ["filler", "s.journal"]


def _journal_bytes_per_trial(tmp_path, table: str, epochs: int) -> float:
    storage = str(tmp_path / f"e{epochs}.journal")
    regsearch.optimize("tabular", n_trials=2, tracking=False, storage=storage, device="cpu",
                       overrides=[("data.path", table), ("data.target", "quality"), ("training.epochs", str(epochs)),
                                  ("training.batch_size", "512"), ("search.pruner.name", "none"),
                                  ("regularizers.early_stopping.enabled", False), ("search.confirm", None)])
    trials = optuna.load_study(study_name="tabular", storage=open_storage(storage)).trials
    assert [len(t.intermediate_values) for t in trials] == [epochs, epochs]
    return (tmp_path / f"e{epochs}.journal").stat().st_size / len(trials)


def test_a_trials_stored_bytes_grow_linearly_with_its_epochs(tmp_path):
    """Every epoch's record is written once: 400 epochs cost about 8 times 50, not 64 times (a rewritten curve)."""
    import pandas as pd

    from tests.test_table import shared_table

    table = tmp_path / "wine.csv"
    pd.read_csv(shared_table("winequality-white.csv")).head(400).to_csv(table, index=False)
    short = _journal_bytes_per_trial(tmp_path, str(table), 50)
    long = _journal_bytes_per_trial(tmp_path, str(table), 400)
    per_epoch = (long - short) / 350
    assert per_epoch < 1_500, f"{per_epoch:.0f} bytes per epoch"
    assert long < 10 * short, (short, long)

    trial = optuna.load_study(study_name="tabular", storage=open_storage(str(tmp_path / "e400.journal"))).trials[1]
    from regsearch._records import trial_curve

    curve = trial_curve(trial)
    assert [row["epoch"] for row in curve] == list(range(1, 401))
    assert {"train_acc", "val_acc", "gap_acc", "val_loss"} <= set(curve[-1])
    assert curve[-1]["val_acc"] == pytest.approx(trial.user_attrs["metrics"]["val_acc"], abs=1e-6)
