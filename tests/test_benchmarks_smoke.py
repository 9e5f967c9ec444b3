"""The benchmark scripts run end to end at tiny sizes (`--quick`), so they cannot rot. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py")


def test_every_target_has_a_script():
    assert {"cifar_throughput.py", "digits_speed.py", "time_to_quality.py", "tracking_overhead.py",
            "startup.py", "memory.py"} <= set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_writes_its_table_and_json(script, tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "median" in done.stdout
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["measures"] and all(m is None or m["min"] <= m["median"] <= m["max"]
                                      for m in result["measures"].values())
