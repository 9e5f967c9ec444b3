"""Target 4: what MLflow tracking adds to a digits study (tracking on vs `tracking=False`, same call otherwise).

Each run is a fresh child process that does what `regsearch optimize --study digits` does in an empty folder:
`regsearch.optimize("digits")` with the default storage (a journal file there) and, when on, the default
tracking store (a new `mlflow.db` there: its creation is part of the cost). On and off alternate (on, off, on,
off ...). The measure is the child's whole wall time, start-up and exit included: with tracking on that covers
the tracking process (MLflow's import, the store's creation, the parent run, a run per trial with per-epoch
metrics, the best model, the study's report), which the study waits for before it returns. The time before
the first trial, from the first trial's start to the last one's end, and from there until `optimize()`
returns are kept apart. The overhead is median(on) / median(off) - 1; the per-pair ratios show the spread.
The peer has no "off" switch, so it is not run here.

With `--ways`, tracking on is measured several ways, each against the same "off" runs (all alternating):
`process` (the default: the tracking process), `inproc` (the same `LocalTracking` in the study's own process,
its own batching thread), `inproc-async` (in-process, each epoch through MLflow's asynchronous `log_batch`,
MLFLOW_ENABLE_ASYNC_LOGGING=true) and `inproc-async-buffered` (the same with
MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS=2, MLflow merging the batches of 2 s into one call).

usage: python benchmarks/tracking_overhead.py [--repeats 5] [--trials 20] [--quick] [--ways process,inproc,...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common


def child(tracking: bool, trials: int, epochs: int | None) -> dict:
    import regsearch

    overrides = [("training.epochs", str(epochs))] if epochs else []
    with tempfile.TemporaryDirectory(prefix="regsearch-bench-") as tmp:
        os.chdir(tmp)
        start, began = time.perf_counter(), time.time()
        study = regsearch.optimize("digits", n_trials=trials, tracking=tracking, device="cpu", overrides=overrides)
        wall, ended = time.perf_counter() - start, time.time()
        trials_run = study.trials
        states = [t.state.name for t in trials_run]
        first = min(t.datetime_start.timestamp() for t in trials_run)
        last = max(t.datetime_complete.timestamp() for t in trials_run)
        os.chdir("/")
    # where the time goes: before the first trial, the trials, after the last trial until optimize() returns
    return {"optimize_s": wall, "trials": len(states), "pruned": states.count("PRUNED"), "before_s": first - began,
            "trials_s": last - first, "after_s": ended - last}


WAYS = {
    "process": {},
    "inproc": {"REGSEARCH_TRACKING_IN_PROCESS": "1"},
    "inproc-async": {"REGSEARCH_TRACKING_IN_PROCESS": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "true"},
    "inproc-async-buffered": {"REGSEARCH_TRACKING_IN_PROCESS": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "true",
                              "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "2"},
}
"""How tracking on is done, as the environment of the child that runs the study."""


def compare_ways(me: list[str], ways: list[str], trials: int, epochs: int, repeats: int, a: object) -> None:
    """Each way of tracking against tracking off, alternating off, way 1, way 2, ... `repeats` times."""
    sides = {"off": (["off"], {})} | {way: (["on"], WAYS[way]) for way in ways}
    runs = common.alternate({side: (lambda arg=arg, env=env: common.run_json([*me, *arg, str(trials), str(epochs)],
                                                                            env=env))
                             for side, (arg, env) in sides.items()}, repeats)
    walls = {side: common.summary([r["process_wall_s"] for r in runs[side]]) for side in sides}
    rows = [(f"{trials} trials, {side}: whole process", walls[side], "s") for side in sides]
    overhead = {side: common.ratio(walls[side], walls["off"]) - 1 for side in ways}
    rows += [(f"{side}: overhead of the medians", {"median": v, "min": v, "max": v}, "fraction")
             for side, v in overhead.items()]
    rows += [(f"{side}: overhead per alternating pair", common.summary(
        [on["process_wall_s"] / off["process_wall_s"] - 1 for on, off in zip(runs[side], runs["off"])]), "fraction")
        for side in ways]
    rows += [(f"{side}: {part}", common.summary([r[part] for r in runs[side]]), "s") for side in sides
             for part in ("before_s", "trials_s", "after_s")]
    common.report("tracking_overhead", a, rows, {
        "overhead_of_medians": overhead,
        "trials": trials, "target": 0.03, "ways": {w: WAYS[w] for w in ways}, "runs": runs})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        epochs = int(sys.argv[4]) or None
        print(json.dumps(child(sys.argv[2] == "on", int(sys.argv[3]), epochs)))
        return
    ap = common.parser(__doc__, "tracking_overhead")
    ap.set_defaults(repeats=5)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--ways", default="process", help=f"comma-separated, of: {', '.join(WAYS)}")
    a = ap.parse_args()
    trials, epochs = (2, 2) if a.quick else (a.trials, 0)
    repeats = 1 if a.quick else a.repeats
    me = [sys.executable, __file__, "--child"]
    ways = a.ways.split(",")
    if ways != ["process"]:
        compare_ways(me, ways, trials, epochs, repeats, a)
        return
    runs = common.alternate({side: (lambda side=side: common.run_json([*me, side, str(trials), str(epochs)]))
                             for side in ("on", "off")}, repeats)
    on, off = ([r["process_wall_s"] for r in runs[side]] for side in ("on", "off"))
    on_opt, off_opt = ([r["optimize_s"] for r in runs[side]] for side in ("on", "off"))
    pairs = [a_on / a_off - 1 for a_on, a_off in zip(on, off)]
    parts = {(side, part): common.summary([r[part] for r in runs[side]]) for side in ("on", "off")
             for part in ("before_s", "trials_s", "after_s")}
    overhead = common.ratio(common.summary(on), common.summary(off)) - 1
    common.report("tracking_overhead", a, [
        (f"{trials} trials, tracking on: whole process", common.summary(on), "s"),
        (f"{trials} trials, tracking off: whole process", common.summary(off), "s"),
        ("tracking on: optimize() alone", common.summary(on_opt), "s"),
        ("tracking off: optimize() alone", common.summary(off_opt), "s"),
        ("overhead per side-by-side pair", common.summary(pairs), "fraction"),
        *((f"tracking {side}: {label}", parts[(side, part)], "s") for part, label in (
            ("before_s", "start until the first trial"), ("trials_s", "first trial's start to last trial's end"),
            ("after_s", "last trial's end until optimize() returns")) for side in ("on", "off")),
    ], {"overhead_of_medians": overhead, "trials": trials, "target": 0.03, "runs": runs})


if __name__ == "__main__":
    main()
