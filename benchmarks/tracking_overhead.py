"""Target 4: what MLflow tracking adds to a digits study (tracking on vs `tracking=False`, Python API).

Each run is a fresh child process running `regsearch.optimize("digits", ...)` with a journal file and, when
on, a new sqlite MLflow store in a temporary folder; on and off alternate. The time is `optimize()`'s wall
time (imports excluded; the parent run, a child run per trial with per-epoch metrics, and the best model
logged at the end all included). The peer has no "off" switch, so it is not run here.

usage: python benchmarks/tracking_overhead.py [--repeats 3] [--trials 20] [--quick]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def child(tracking: bool, trials: int, epochs: int | None) -> dict:
    import regsearch

    overrides = [("training.epochs", str(epochs))] if epochs else []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        study = regsearch.optimize("digits", n_trials=trials, storage=f"{tmp}/s.journal", tracking=tracking,
                                   tracking_uri=f"sqlite:///{tmp}/mlflow.db", device="cpu", overrides=overrides)
        wall = time.perf_counter() - start
        states = [t.state.name for t in study.trials]
    return {"wall_s": wall, "trials": len(states), "pruned": states.count("PRUNED")}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        epochs = int(sys.argv[4]) or None
        print(json.dumps(child(sys.argv[2] == "on", int(sys.argv[3]), epochs)))
        return
    ap = common.parser(__doc__, "tracking_overhead")
    ap.add_argument("--trials", type=int, default=20)
    a = ap.parse_args()
    trials, epochs = (2, 2) if a.quick else (a.trials, 0)
    repeats = 1 if a.quick else a.repeats
    me = [sys.executable, __file__, "--child"]
    runs = common.alternate({side: (lambda side=side: common.run_json([*me, side, str(trials), str(epochs)]))
                             for side in ("on", "off")}, repeats)
    on = common.summary([r["wall_s"] for r in runs["on"]])
    off = common.summary([r["wall_s"] for r in runs["off"]])
    pairs = [r_on["wall_s"] / r_off["wall_s"] - 1 for r_on, r_off in zip(runs["on"], runs["off"])]
    overhead = common.ratio(on, off) - 1
    common.report("tracking_overhead", a, [
        (f"digits study, {trials} trials, tracking on", on, "s"),
        (f"digits study, {trials} trials, tracking off", off, "s"),
        ("overhead per side-by-side pair", common.summary(pairs), "fraction"),
    ], {"overhead_of_medians": overhead, "trials": trials, "runs": runs})


if __name__ == "__main__":
    main()
