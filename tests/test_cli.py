"""The command line: listings, a real digits study, and one clear line with exit 2 for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import optuna
import pytest
from click.testing import CliRunner

from regsearch.cli import cli

EXE = os.path.join(os.path.dirname(sys.executable), "regsearch")
"""The installed `regsearch` entry point, as a user runs it."""


def run(*args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def journal_trials(folder, study: str = "digits") -> list[optuna.trial.FrozenTrial]:
    """The trials of `study` in the default journal file of `folder`, read with plain Optuna as a user would."""
    storage = optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "regsearch.journal")))
    return optuna.load_study(study_name=study, storage=storage).trials


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_studies_lists_each_shipped_study_with_its_description():
    result = invoke("studies")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "MLP on scikit-learn's 8x8 digits" in lines["digits"]
    assert "CIFAR-10" in lines["cifar"]


def test_studies_starts_without_loading_the_spec_validation():
    code = ("import sys\nfrom regsearch.cli import cli\ncli(['studies'], standalone_mode=False)\n"
            "print('pydantic imported:', 'pydantic' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "digits" in result.stdout and "pydantic imported: False" in result.stdout


def test_plugins_lists_builtins_and_a_file_plugin_with_source_and_space(tmp_path):
    path = tmp_path / "shake.py"
    path.write_text(textwrap.dedent("""
        import regsearch

        @regsearch.register("shake")
        class Shake(regsearch.Regularizer):
            '''Shakes the weights a little.'''

            def search_space(self, trial):
                return {"amount": trial.suggest_float("amount", 0.001, 0.1, log=True)}
    """))
    result = invoke("plugins", "--plugin", str(path))
    assert result.exit_code == 0, result.output
    assert "l1  [built-in]" in result.output and "l1.strength: float in [1e-06, 0.001] log" in result.output
    assert f"shake  [file {path}]" in result.output
    assert "Shakes the weights a little." in result.output
    assert "shake.amount: float in [0.001, 0.1] log" in result.output


@pytest.mark.slow
def test_optimize_digits_end_to_end_then_show_and_resume(tmp_path):
    args = ["optimize", "--study", "digits", "--n-trials", "3", "--set", "training.epochs=5"]
    first = run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "study digits: 3 complete" in first.stdout
    assert "val_acc gap_acc train_acc" in first.stdout
    assert "best trial" in first.stdout and "test accuracy" in first.stdout
    # defaults: a journal file for Optuna, mlflow.db for MLflow, both in the current folder
    assert (tmp_path / "regsearch.journal").is_file() and (tmp_path / "mlflow.db").is_file()
    shown = run("show", "--study", "digits", cwd=tmp_path)
    assert shown.returncode == 0 and "study digits: 3 complete" in shown.stdout
    again = run(*[a if a != "3" else "4" for a in args], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "study digits: 4 complete" in again.stdout
    assert len(journal_trials(tmp_path)) == 4


def test_output_piped_into_a_reader_that_left_early_is_not_an_error():
    reader, writer = os.pipe()
    os.close(reader)  # `regsearch studies | head -0`: nobody reads what it prints
    try:
        done = subprocess.run([EXE, "studies"], stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(writer)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_timeout_alone_replaces_the_study_files_trial_count(tmp_path):
    args = ["optimize", "--study", "digits", "--set", "search.n_trials=1", "--set", "training.epochs=1",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    done = run(*args, "--timeout", "10", cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    def finished() -> int:
        trials = journal_trials(tmp_path)
        return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)

    searched = finished()
    assert searched > 1, "the study stopped at the file's n_trials: 1 despite --timeout 10"
    capped = run(*args, "--timeout", "20", "--n-trials", str(searched + 1), cwd=tmp_path)
    assert capped.returncode == 0, capped.stderr
    assert finished() == searched + 1  # --n-trials and --timeout together: whichever comes first


BAD_INPUT = [
    (["optimize", "--study", "digts"], r"unknown study 'digts' (did you mean 'digits'?)"),
    (["optimize", "--study", "digits", "--n-trials", "0"], "0 is not in the range x>=1."),
    (["optimize", "--study", "digits", "--n-trials", "x"], "'x' is not a valid integer"),
    (["optimize", "--study", "digits", "--timeout", "-5"], "-5.0 is not in the range x>0."),
    (["optimize", "--study", "digits", "--set", "training.epochs"], "expected KEY=VALUE"),
    (["optimize", "--study", "digits", "--set", "training.epoch=3"], "training.epoch: unknown key (did you mean 'epochs'?)"),
    (["optimize", "--study", "digits", "--set", "training.epochs=three"], "training.epochs: expected a whole number"),
    (["optimize", "--study", "digits", "--device", "cuda"], "--device cuda: no CUDA device"),
    (["optimize", "--study", "digits", "--device", "tpu"], "'tpu' is not one of"),
    (["optimize", "--study", "digits", "--plugin", "/nonexistent/p.py"], "plugin file /nonexistent/p.py does not exist"),
    (["optimize", "--study", "digits", "--storage", "redis://127.0.0.1/0"], "unknown scheme 'redis'"),
    (["optimize", "--study", "/no/such/study.yaml"], "study file /no/such/study.yaml does not exist"),
    (["show", "--study", "never-ran", "--storage", "{tmp}/none.journal"], "none.journal does not exist; pass --storage"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a[1:3]) + "|" + m[:20] for a, m in BAD_INPUT])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1


def test_an_unreachable_database_is_one_line_with_the_password_masked(tmp_path):
    result = run("optimize", "--study", "digits", "--storage", "postgresql://alice:s3cret@127.0.0.1:1/db",
                 cwd=tmp_path)
    assert result.returncode == 2
    assert "postgresql://alice:***@127.0.0.1:1/db" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    result = run("--debug", "optimize", "--study", "digits", "--storage", "redis://x", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "StorageError" in result.stderr


def test_a_bad_study_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("regularizers:\n  dropout: {p: [0.2, 1.5]}\n")
    result = run("optimize", "--study", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "Error: regularizers.dropout.p: must be in [0.0, 1.0); got [0.2, 1.5]"
