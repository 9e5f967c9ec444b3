"""The Optuna storage: read-only commands create nothing."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from regsearch.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


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
