"""Target 3: time to quality on the CIFAR sample: `regsearch optimize --study cifar` with its defaults vs the peer.

Two child processes per repeat, alternating, each from a fresh empty folder (start-up included):
- the peer with its defaults (12 trials x 8 epochs; `--peer-trials` shrinks it when time is short);
- regsearch, the whole default study: wall time, the best trial's test accuracy, and per trial the time it
  finished (since the process started) with its validation accuracy. Two trials have a test accuracy: the
  unregularized baseline (trial 0, tested when it ends) and the study's best (tested at the end).
The bar: the peer's best test accuracy reached within 1/6 of the peer's wall time (the first tested trial at
or above it, by the time it finished), and >= 0.68 test accuracy for regsearch's best trial within the peer's
wall time. `--float32` adds a third side, the same study pinned to float32 (`training.precision=float32`), to
see what bfloat16 autocast (the default on CPUs with native bf16) does to time and accuracy.

usage: python benchmarks/time_to_quality.py [--repeats 1] [--peer-trials 12] [--float32] [--quick]
"""

from __future__ import annotations

import datetime
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def run_regsearch(data: str, extra: list[str]) -> dict:
    import subprocess

    import optuna

    with tempfile.TemporaryDirectory(prefix="regsearch-ttq-") as tmp:
        started = datetime.datetime.now()
        start = time.perf_counter()
        subprocess.run([common.regsearch_exe(), "optimize", "--study", "cifar", "--data-dir", data, *extra],
                       cwd=tmp, check=True, capture_output=True)
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name="cifar", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(f"{tmp}/regsearch.journal")))
        test = study.user_attrs.get("best_test", {})
        timeline = [{"trial": t.number, "state": t.state.name, "epochs": t.user_attrs.get("epochs"),
                     "done_s": (t.datetime_complete - started).total_seconds(),
                     "val_acc": t.user_attrs.get("metrics", {}).get("val_acc"),
                     "baseline": bool(t.user_attrs.get("baseline")),
                     "test_acc": (test.get("test_acc") if t.number == test.get("trial")
                                  else t.user_attrs.get("test_acc"))}
                    for t in study.trials if t.datetime_complete is not None]
        summary = study.user_attrs.get("summary")
    return {"wall_s": wall, "test_acc": test.get("test_acc"), "best_trial": test.get("trial"),
            "trials": len(timeline), "timeline": timeline, "summary": summary}


def first_reaching(run: dict, bar: float) -> float | None:
    """Seconds (from the process start) at which a trial whose test accuracy is >= bar had finished."""
    times = [t["done_s"] for t in run["timeline"] if t["test_acc"] is not None and t["test_acc"] >= bar]
    return min(times) if times else None


def main() -> None:
    ap = common.parser(__doc__, "time_to_quality")
    ap.set_defaults(repeats=1)
    ap.add_argument("--peer-trials", type=int, default=12, help="the peer's trials (its default: 12)")
    ap.add_argument("--float32", action="store_true", help="also run the study pinned to float32")
    a = ap.parse_args()
    repeats = 1 if a.quick else a.repeats
    with common.temp_dir() as tmp:
        folder, what = common.cifar_folder(a.data, Path(tmp), a.quick)
        data = str(folder) if a.quick or not Path(a.data).is_file() else a.data  # regsearch takes the archive
        shrink = ["--set", "training.epochs=2", "--set", "search.pruner.min_resource=1"] if a.quick else []
        own = ["--n-trials", "2", *shrink] if a.quick else []
        sides = {"regsearch default study": lambda: run_regsearch(data, own)}
        if a.float32:
            sides["regsearch, float32"] = lambda: run_regsearch(data, [*own, "--set", "training.precision=float32"])
        if Path(a.peer).is_file():
            peer_args = ["--n-trials", "1", "--epochs", "1"] if a.quick else ["--n-trials", str(a.peer_trials)]
            sides["peer"] = lambda: common.run_json([sys.executable, a.peer, "--data", "cifar", "--data-dir",
                                                     str(folder), *peer_args])
            sides = {"peer": sides.pop("peer"), **sides}
        runs = common.alternate(sides, repeats)
    peer = runs.get("peer")
    rows = []
    for side, v in runs.items():
        wall = "process_wall_s" if side == "peer" else "wall_s"
        test = "test_acc_of_best" if side == "peer" else "test_acc"
        rows += [(f"{side}: wall", common.summary([r[wall] for r in v]), "s"),
                 (f"{side}: best test accuracy", common.summary([r[test] for r in v]), "")]
    full = runs["regsearch default study"]
    extra = {"data": what, "peer_trials": None if a.quick else a.peer_trials}
    if peer:
        peer_wall = common.summary([r["process_wall_s"] for r in peer])["median"]
        peer_test = common.summary([r["test_acc_of_best"] for r in peer])["median"]
        reached = [first_reaching(r, peer_test) for r in full]
        if all(t is not None for t in reached):
            rows.append(("regsearch: time to the peer's best test accuracy", common.summary(reached), "s"))
        extra.update({
            "peer_wall_s": peer_wall, "peer_test_acc": peer_test, "time_to_peer_test_s": reached,
            "time_to_peer_test_fraction_of_peer_wall": [t / peer_wall if t is not None else None for t in reached],
            "study_fraction_of_peer_wall": common.summary([r["wall_s"] for r in full])["median"] / peer_wall,
            "best_test_within_peer_wall": [r["test_acc"] if r["wall_s"] <= peer_wall else None for r in full],
        })
    extra["runs"] = runs
    common.report("time_to_quality", a, rows, extra)


if __name__ == "__main__":
    main()
