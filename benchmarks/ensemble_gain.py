"""What the confirmation's ensemble is worth: the winner's models (one per confirmation seed) averaged, their gain over
one model on validation (what decides), and on the test split scored by the logged model in a fresh process.

Digits (the shipped study, fewer trials; and a small network trained 3 epochs on 200 rows) and the white wine
table (the `tabular` study; the file split 75/25, stratified, into a training and a test file), each searched,
then confirmed with 5 seeds, tracked in a SQLite store. The models (the search's single best one, logged; the
ensemble, logged where it beat one model beyond noise, else saved as the same pyfunc) are loaded in a fresh
process in another folder and scored on the raw test rows.

usage: python benchmarks/ensemble_gain.py [--seeds 5]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

WINE = common.REPO.parent / "shared" / "datasets" / "tabular" / "winequality-white.csv"

SCORE = """
import json, sys
sys.modules["regsearch"] = None  # the logged model must not need regsearch
import mlflow, numpy as np, pandas as pd
if sys.argv[2].endswith(".csv"):
    table = pd.read_csv(sys.argv[2])
    x, y = table.drop(columns=sys.argv[3]), table[sys.argv[3]]
else:
    x, y = np.load(sys.argv[2]), np.load(sys.argv[3])
labels = mlflow.pyfunc.load_model(sys.argv[1]).predict(x)
print(json.dumps({"test_acc": float(np.mean([str(a) == str(b) for a, b in zip(labels, np.asarray(y))]))}))
"""


def main() -> None:
    ap = common.parser(__doc__, "ensemble_gain")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    seeds = 2 if args.quick else args.seeds
    cases = {"digits": ["--study", "digits", "--n-trials", "3" if args.quick else "10"]
             + (["--set", "training.epochs=3", "--set", "data.train_size=300"] if args.quick else [])}
    if not args.quick:  # undertrained networks on few rows: far apart from seed to seed, where averaging pays
        cases["digits-small"] = ["--study", "digits", "--study-name", "digits-small", "--n-trials", "3", "--set",
                                 "training.epochs=3", "--set", "data.train_size=400", "--set", "data.val_fraction=0.5",
                                 "--set", "model.hidden=[16]"]
    if not args.quick and WINE.is_file():
        cases["wine"] = ["--study", "tabular", "--study-name", "wine", "--n-trials", "10", "--set",
                         "data.path=wine-train.csv", "--set", "data.target=quality", "--set",
                         "data.test_path=wine-test.csv"]
    rows, measures = [], []
    for name, options in cases.items():
        with tempfile.TemporaryDirectory() as folder:
            row = run_case(name, options, seeds, Path(os.path.realpath(folder)))
        rows.append(row)
        measures += [(f"{name}: study + confirmation", common.summary([row["seconds"]]), "s"),
                     (f"{name}: ensemble gain, validation", common.summary([100 * row["val_gain"]]), "points"),
                     (f"{name}: ensemble gain, test (fresh process)", common.summary([100 * row["test_gain_fresh"]]),
                      "points")]
    common.report("ensemble_gain", args, measures, {"seeds": seeds, "rows": rows})


def run_case(name: str, options: list[str], seeds: int, folder: Path) -> dict:
    """One study searched (by the command line) and confirmed (in this process) in `folder`; its ensemble's record and
    the fresh-process test scores. An ensemble within noise is not logged: its pyfunc is saved to a folder instead,
    so that its test gain is measured the same way."""
    import optuna

    import regsearch
    from regsearch import _confirm
    from regsearch.tracking._pyfunc import pyfunc_options, saving
    from regsearch.tracking._store import MODEL_ATTR

    test_inputs = write_inputs(name, folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    started = time.perf_counter()
    subprocess.run([common.regsearch_exe(), "optimize", *options, "--storage", "s.journal", "--tracking-uri", uri],
                   cwd=folder, check=True, capture_output=True)
    formed = []
    real = _confirm.form_ensemble
    _confirm.form_ensemble = lambda *a: formed.append(real(*a)) or formed[-1]  # to keep its predictor
    os.chdir(folder)
    try:
        regsearch.confirm(name, storage="s.journal", top=1, seeds=seeds, tracking_uri=uri)
    finally:
        _confirm.form_ensemble = real
        os.chdir(common.REPO)
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name=name, storage=regsearch._storage.open_storage(str(folder / "s.journal")))
    record, model = study.user_attrs["confirm"]["ensemble"], study.user_attrs[MODEL_ATTR]
    ensemble_uri = model["uri"] if model.get("ensemble") else str(folder / "unchosen-ensemble")
    if not model.get("ensemble"):
        import mlflow

        predictor = formed[-1][1]
        with saving():
            mlflow.pyfunc.save_model(ensemble_uri, **pyfunc_options(predictor, None))
    single, ensemble = score(model.get("single", model)["uri"], test_inputs, folder), score(
        ensemble_uri, test_inputs, folder)
    members_test = record["test_acc"] - record["test_gain"]
    return {"data": name, "seconds": seconds, "models": record["models"], "trial": record["trial"],
            "val_acc": record["val_acc"], "val_gain": record["val_gain"], "val_gain_sd": record["val_gain_sd"],
            "beats": record["beats"], "logged": bool(model.get("ensemble")), "test_acc": record["test_acc"],
            "test_gain": record["test_gain"], "members_test_acc_mean": members_test,
            "predict_time_ratio": record["predict_time_ratio"], "logged_single_test_acc_fresh": single,
            "ensemble_test_acc_fresh": ensemble, "test_gain_fresh": ensemble - members_test,
            "sentence": record["sentence"]}


def write_inputs(name: str, folder: Path) -> tuple[str, str]:
    """The test split as a user has it, written in `folder` (wine: the training file too): what `score` reads."""
    from sklearn.model_selection import train_test_split

    if name == "wine":
        import pandas as pd

        table = pd.read_csv(WINE)
        train, test = train_test_split(table, test_size=0.25, random_state=0, stratify=table["quality"])
        train.to_csv(folder / "wine-train.csv", index=False)
        test.to_csv(folder / "wine-test.csv", index=False)
        return str(folder / "wine-test.csv"), "quality"
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    _, x_test, _, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    np.save(folder / "x.npy", x_test)
    np.save(folder / "y.npy", y_test)
    return str(folder / "x.npy"), str(folder / "y.npy")


def score(uri: str, inputs: tuple[str, str], folder: Path) -> float:
    """The logged model `uri`'s test accuracy, loaded in a fresh process in an empty folder (regsearch blocked)."""
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(elsewhere), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-c", SCORE, uri, *inputs], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["test_acc"]


if __name__ == "__main__":
    main()
