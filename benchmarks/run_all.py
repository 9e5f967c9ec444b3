"""Run every benchmark script in turn (one per target of the performance issue); each writes its own JSON.

usage: python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["startup.py", "digits_speed.py", "cifar_throughput.py", "tracking_overhead.py", "memory.py",
         "time_to_quality.py"]


def main() -> None:
    failed = [name for name in ORDER if subprocess.run([sys.executable, str(HERE / name), *sys.argv[1:]]).returncode]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
