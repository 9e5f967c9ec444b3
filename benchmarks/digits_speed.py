"""Speed of the core on digits: one 30-epoch trial, and the whole default `regsearch optimize --study digits`.

usage: python benchmarks/digits_speed.py [--repeats 5] [--out benchmarks/results/digits_speed.json] [--quick]
Prints a table and writes JSON. `--quick` uses tiny sizes (CI smoke run: the script must not rot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def one_trial_seconds(epochs: int) -> float:
    from regsearch._spec import load_study
    from regsearch._study import build_trial, prepare, trial_seed
    from regsearch._trainer import fit
    import optuna

    spec = load_study("digits", [("training.epochs", str(epochs))])
    exp = prepare(spec, device="cpu")
    trial = optuna.create_study(direction="maximize").ask()
    start = time.perf_counter()
    seed = trial_seed(spec.seed, 0)
    model, applied, lr = build_trial(exp, trial, seed)
    fit(model, exp.data, applied, spec.training, lr=lr, device=exp.device, seed=seed)
    return time.perf_counter() - start


def whole_study_seconds(extra: list[str]) -> float:
    exe = Path(sys.executable).parent / "regsearch"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([str(exe), "optimize", "--study", "digits", *extra], cwd=tmp, check=True,
                       capture_output=True)
        return time.perf_counter() - start


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/digits_speed.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for the CI smoke run")
    a = ap.parse_args()
    epochs = 2 if a.quick else 30
    repeats = 1 if a.quick else a.repeats
    study_args = ["--n-trials", "2", "--set", "training.epochs=2"] if a.quick else []
    trial = summary([one_trial_seconds(epochs) for _ in range(repeats)])
    study = summary([whole_study_seconds(study_args) for _ in range(1 if a.quick else 3)])
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}", "quick": a.quick,
              f"digits_trial_{epochs}_epochs_s": trial, "digits_default_study_s": study}
    print(f"{'measure':<34} {'median':>8} {'min':>8} {'max':>8}")
    for key in (f"digits_trial_{epochs}_epochs_s", "digits_default_study_s"):
        s = result[key]
        print(f"{key:<34} {s['median']:>8.2f} {s['min']:>8.2f} {s['max']:>8.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
