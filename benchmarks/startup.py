"""Target 5: start-up of `regsearch --help` and `regsearch studies` (a fresh process each, wall time).

The peer's `--help` (it imports torch, optuna and numpy at the top, as hand-written scripts do) is measured
alternately as the reference. `python -X importtime` of `regsearch --help` is summarised to show which
imports remain.

usage: python benchmarks/startup.py [--repeats 10] [--quick]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def heaviest_imports(cmd_module: str, top: int = 8) -> list[tuple[str, float]]:
    """The slowest top-level imports of a process (cumulative, seconds), from `python -X importtime`."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", cmd_module], capture_output=True, text=True)
    rows = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
            rows.append((parts[2].strip(), int(parts[1]) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    ap = common.parser(__doc__, "startup")
    ap.set_defaults(repeats=10)
    a = ap.parse_args()
    repeats = 1 if a.quick else a.repeats
    exe = common.regsearch_exe()
    sides = {"regsearch --help": lambda: timed([exe, "--help"]),
             "regsearch studies": lambda: timed([exe, "studies"])}
    if Path(a.peer).is_file():
        sides["peer --help"] = lambda: timed([sys.executable, a.peer, "--help"])
    timed([exe, "--help"])  # page the files in once: the first process of all pays the disk
    runs = common.alternate(sides, repeats)
    stats = {k: common.summary(v) for k, v in runs.items()}
    imports = heaviest_imports("import sys; sys.argv=['regsearch','--help']\n"
                               "from regsearch.cli import main\ntry: main()\nexcept SystemExit: pass")
    common.report("startup", a, [(k, s, "s") for k, s in stats.items()],
                  {"heaviest_imports_of_help_s": imports, "runs": runs})
    for name, seconds in imports:
        print(f"  import {name:<40} {seconds:.3f} s")


if __name__ == "__main__":
    main()
