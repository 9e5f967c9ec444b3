"""Target 2: a digits trial of regsearch vs the peer's digits trial (same MLP, same epochs, same data split).

Both sides run a small study in a fresh child process, alternating: the peer script itself
(`--data digits --n-trials T --epochs E`, its `s_per_trial`), and regsearch's Python API on the peer's MLP
(Linear 64-256-256-10 with ReLU, dropout and weight decay always on, their values searched; no pruning),
tracked to MLflow like the peer. A trial's time is its Optuna duration (start to finish, tracking included);
start-up (imports, data) is reported apart. The floor is what a trial's training arithmetic alone takes at
this machine's sgemm rate measured in the same run (FLOPs of forward and backward by torch's flop counter,
times the training samples and epochs): no trial on this CPU can be faster.

usage: python benchmarks/digits_speed.py [--repeats 3] [--trials 3] [--epochs 20] [--quick]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def child_regsearch(trials: int, epochs: int) -> dict:
    start = time.perf_counter()
    import regsearch
    from regsearch._study_file import load_study

    overrides = [("training.epochs", str(epochs)), ("model.hidden", "[256, 256]"),
                 ("search.pruner", "{name: none}"), ("search.baseline", "false"), ("search.first_trial", "{}"),
                 ("regularizers", "{dropout: {enabled: true, per_site: false, p: [0.0, 0.5]}, "
                                  "l2: {enabled: true, weight_decay: [1.0e-6, 1.0e-2]}}")]
    spec = load_study("digits", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        study = regsearch.optimize(spec, n_trials=trials, storage=f"{tmp}/s.journal",
                                   tracking_uri=f"sqlite:///{tmp}/mlflow.db", device="cpu")
        durations = [t.duration.total_seconds() for t in study.trials]
        best, test = study.best_value, study.user_attrs["best_test"]["test_acc"]
    return {"s_per_trial": statistics.median(durations), "durations": durations,
            "process_s": time.perf_counter() - start, "best_val_acc": best, "test_acc": test}


def child_floor(epochs: int, quick: bool) -> dict:
    """The arithmetic floor of one trial: its training FLOPs at this machine's sgemm rate, measured now."""
    from regsearch.data import load_dataset
    from regsearch.models import mlp

    data = load_dataset("digits", val_fraction=0.2, seed=0)
    per_sample = common.training_flops_per_sample(mlp((64,), 10, hidden=(256, 256)), data.x_train[:64],
                                                  data.y_train[:64])
    gflops = common.sgemm_gflops(quick)
    trial_gflop = per_sample * len(data.x_train) * epochs / 1e9
    return {"sgemm_gflops": gflops, "training_samples": len(data.x_train), "gflop_per_trial": trial_gflop,
            "floor_s": trial_gflop / gflops}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        if sys.argv[2] == "floor":
            print(json.dumps(child_floor(int(sys.argv[3]), sys.argv[4] == "quick")))
        else:
            print(json.dumps(child_regsearch(int(sys.argv[2]), int(sys.argv[3]))))
        return
    ap = common.parser(__doc__, "digits_speed")
    ap.add_argument("--trials", type=int, default=3, help="trials per study run")
    ap.add_argument("--epochs", type=int, default=20)
    a = ap.parse_args()
    trials, epochs = (1, 2) if a.quick else (a.trials, a.epochs)
    repeats = 1 if a.quick else a.repeats
    sides = {"regsearch": lambda: common.run_json([sys.executable, __file__, "--child", str(trials), str(epochs)]),
             "floor": lambda: common.run_json([sys.executable, __file__, "--child", "floor", str(epochs),
                                               "quick" if a.quick else "full"])}
    if Path(a.peer).is_file():
        sides["peer"] = lambda: common.run_json([sys.executable, a.peer, "--data", "digits", "--n-trials",
                                                 str(trials), "--epochs", str(epochs)])
    runs = common.alternate(sides, repeats)
    floor_runs = runs.pop("floor")
    floor = common.summary([r["floor_s"] for r in floor_runs])
    trial = {k: common.summary([r["s_per_trial"] for r in v]) for k, v in runs.items()}
    process = {k: common.summary([r["process_wall_s"] for r in v]) for k, v in runs.items()}
    extra = {"trials_per_run": trials, "epochs": epochs,
             "speedup_per_trial_vs_peer": common.ratio(trial.get("peer"), trial["regsearch"]),
             "regsearch_over_floor": common.ratio(trial["regsearch"], floor),
             "peer_over_floor": common.ratio(trial.get("peer"), floor), "floor_runs": floor_runs,
             "regsearch_best_val_acc": statistics.median(r["best_val_acc"] for r in runs["regsearch"]),
             "peer_best_val_acc": statistics.median(r["best_val_acc"] for r in runs["peer"]) if "peer" in runs
             else None, "runs": runs}
    common.report("digits_speed", a, [
        (f"regsearch, one {epochs}-epoch trial", trial["regsearch"], "s"),
        (f"peer, one {epochs}-epoch trial", trial.get("peer"), "s"),
        (f"regsearch, whole process ({trials} trials)", process["regsearch"], "s"),
        (f"peer, whole process ({trials} trials)", process.get("peer"), "s"),
        (f"floor: a {epochs}-epoch trial's training FLOPs at the sgemm rate", floor, "s"),
    ], extra)


if __name__ == "__main__":
    main()
