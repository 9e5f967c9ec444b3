"""The benchmark scripts run end to end at tiny sizes (`--quick`), so they cannot rot. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import require

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TABLES = BENCHMARKS.parent.parent / "shared" / "datasets" / "tabular"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py")


def test_every_target_has_a_script():
    assert {"cifar_throughput.py", "digits_speed.py", "time_to_quality.py", "tracking_overhead.py",
            "startup.py", "memory.py"} <= set(SCRIPTS)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory, request) -> dict[str, tuple[subprocess.CompletedProcess | str, Path]]:
    """The selected scripts' `--quick` runs, two at a time: much of each is one core importing torch in a child.
    A run that hangs or cannot start is its own script's failure (the text of why), not every script's."""
    def run(script: str) -> tuple[subprocess.CompletedProcess | str, Path]:
        folder = tmp_path_factory.mktemp(script.removesuffix(".py"))
        out = folder / "result.json"
        try:
            done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out)],
                                  capture_output=True, text=True, timeout=600, cwd=folder)
        except (subprocess.TimeoutExpired, OSError) as exc:
            return f"{script}: {exc}", out
        return done, out

    selected = [item.callspec.params["script"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_quick_run_writes_its_table_and_json"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(selected, pool.map(run, selected)))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_writes_its_table_and_json(script, quick_runs):
    if script == "table_gap.py":
        require(TABLES.is_dir(), f"table_gap.py reads the shared UCI tables, not at {TABLES}")
    done, out = quick_runs[script]
    assert not isinstance(done, str), done
    assert done.returncode == 0, done.stderr[-3000:]
    assert "median" in done.stdout
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["measures"] and all(m is None or m["min"] <= m["median"] <= m["max"]
                                      for m in result["measures"].values())
