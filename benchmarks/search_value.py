"""The search's value: does a study's search find a configuration that beats its own recipe, beyond seed noise?

For each data set and study seed, two searches get the same wall time (`--timeout`, no MLflow for either):
- the study as shipped (its sampler and pruner: TPE with Hyperband or the median rule);
- random search (the same study with `search.sampler.name=random` and no pruner).
Both start with the unregularized baseline and the recipe (the study's `first_trial`). Each study's finalists
(top 2), its recipe and its baseline are then confirmed with 3 fresh seeds (`regsearch.confirm`): every number
in the table is a confirmed mean, test accuracy read after the choice was made on validation accuracy. Baseline
and recipe come from the shipped study's confirmation (the same seeds as its finalists). On the tables,
scikit-learn's HistGradientBoostingClassifier (defaults, fitted on the same training split) is the yardstick.

Data: scikit-learn's digits, the shared CIFAR-10 sample, and the shared UCI tables adult (its own test file)
and winequality-white (a stratified quarter held out as the test file, seed 0). Each cell runs in a child process.

usage: python benchmarks/search_value.py [--datasets digits,wine,adult,cifar] [--seeds 3] [--budget-scale 1.0]
       [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

TABLES = common.REPO.parent / "shared" / "datasets" / "tabular"
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"study": "digits", "budget_s": 60},
    "wine": {"study": "tabular", "budget_s": 180},
    "adult": {"study": "tabular", "budget_s": 240},
    "cifar": {"study": "cifar", "budget_s": 300},
}
CONDITIONS = {"study": [], "random": [("search.sampler.name", "random"), ("search.pruner.name", "none")]}
TOP, CONFIRM_SEEDS = 2, 3


def data_overrides(name: str, tmp: Path, quick: bool) -> tuple[list[tuple[str, Any]], str | None]:
    """The `--set` pairs (and the CIFAR data folder) that point a study at `name`'s data."""
    if name == "digits":
        return ([("data.train_size", 300), ("training.epochs", 6)] if quick else []), None
    if name == "cifar":
        if quick:
            raise SystemExit("--quick runs digits only")
        folder = tmp / "cifar"
        with tarfile.open(common.CIFAR_SAMPLE) as tar:
            tar.extractall(folder, filter="data")
        return [], str(folder)
    if name == "adult":
        return [("data.path", str(TABLES / "adult-train.csv")), ("data.test_path", str(TABLES / "adult-test.csv")),
                ("data.target", "income")], None
    if name == "wine":
        train, test = wine_split(tmp)
        return [("data.path", str(train)), ("data.test_path", str(test)), ("data.target", "quality")], None
    raise SystemExit(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")


def wine_split(tmp: Path) -> tuple[Path, Path]:
    """winequality-white has no test file: hold out a stratified quarter (seed 0) as one."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    table = pd.read_csv(TABLES / "winequality-white.csv")
    train, test = train_test_split(table, test_size=0.25, random_state=0, stratify=table["quality"])
    paths = tmp / "wine-train.csv", tmp / "wine-test.csv"
    train.to_csv(paths[0], index=False)
    test.to_csv(paths[1], index=False)
    return paths


def run_cell(name: str, condition: str, seed: int, budget_s: float, quick: bool,
             extra: list[tuple[str, str]]) -> dict[str, Any]:
    """One search of `budget_s` seconds and its confirmation, in this process (`extra`: --set pairs)."""
    import regsearch
    from regsearch._opening import load_stored_study
    from regsearch._study_file import load_study

    with common.temp_dir() as folder:
        tmp = Path(folder)
        overrides, data_dir = data_overrides(name, tmp, quick)
        overrides += [("seed", seed), *extra, *CONDITIONS[condition]]
        spec = load_study(DATASETS[name]["study"], overrides)
        storage = str(tmp / "study.journal")
        start = time.perf_counter()
        study = regsearch.optimize(spec, n_trials=100_000, timeout=budget_s, storage=storage, tracking=False,
                                   data_dir=data_dir)
        searched_s = time.perf_counter() - start
        best = regsearch.leaderboard(study, top=1)[0]["number"]
        start = time.perf_counter()
        rows = regsearch.confirm(spec, top=TOP, seeds=2 if quick else CONFIRM_SEEDS, storage=storage,
                                 tracking=False, data_dir=data_dir)
        confirm_s = time.perf_counter() - start
        states = [t.state.name for t in study.trials]
        confirmed = load_stored_study(spec.name, storage, None).user_attrs["confirm"]
        return {"data": name, "condition": condition, "seed": seed, "budget_s": budget_s, "search_s": searched_s,
                "confirm_s": confirm_s, "trials": {s: states.count(s) for s in set(states)},
                "single_run_best": best, "rows": [{k: r[k] for k in (
                    "trial", "role", "config", "params", "winner", "val_acc", "val_acc_mean", "val_acc_sd",
                    "test_acc_mean", "test_acc_sd", "test_acc", "single_run_val_acc")} for r in rows],
                "sentence": confirmed["sentence"], "hgb_test_acc": hgb(spec, data_dir)}


def hgb(spec: Any, data_dir: str | None) -> float | None:
    """HistGradientBoostingClassifier (defaults) on a table study's training split, scored on its test split."""
    if spec.data.name != "table":
        return None
    from sklearn.ensemble import HistGradientBoostingClassifier

    from regsearch._experiment import prepare

    data = prepare(spec, data_dir=data_dir).data
    model = HistGradientBoostingClassifier(random_state=0).fit(data.x_train.cpu().numpy(), data.y_train.cpu().numpy())
    return float(model.score(data.x_test.cpu().numpy(), data.y_test.cpu().numpy()))


def role(cell: dict[str, Any], which: str) -> dict[str, Any] | None:
    """The confirmed row of the winner (`which` = winner), the recipe or the baseline."""
    if which == "winner":
        return next(r for r in cell["rows"] if r["winner"])
    return next((r for r in cell["rows"] if r["role"] == which), None)


def beats_recipe(cell: dict[str, Any]) -> bool | None:
    """Whether the confirmation said a searched configuration beats the recipe beyond noise (None: no recipe was
    confirmed, the sentence then speaks of the baseline)."""
    if role(cell, "recipe") is None:
        return None
    return " beats the recipe " in cell["sentence"] and "no searched configuration beats" not in cell["sentence"]


def count(cells: list[dict[str, Any]]) -> str:
    known = [b for b in map(beats_recipe, cells) if b is not None]
    return f"{sum(known)}/{len(known)}"


def table(cells: list[dict[str, Any]]) -> list[str]:
    """One Markdown row per data set: confirmed test accuracy, mean over study seeds ± their spread."""

    def stat(values: list[float | None]) -> str:
        known = [v for v in values if v is not None]
        if not known:
            return "-"
        sd = f" ± {statistics.stdev(known):.3f}" if len(known) > 1 else ""
        return f"{statistics.fmean(known):.3f}{sd}"

    lines = ["| data | seeds | budget | baseline | recipe | study search | random search | searched beats recipe "
             "beyond noise (study / random) | single-run winner was the recipe | HGB |", "|" + "---|" * 10]
    variants = dict.fromkeys((c["data"], tuple(c.get("overrides", ()))) for c in cells)
    for name, overrides in sorted(variants, key=lambda v: (list(DATASETS).index(v[0]), v[1])):
        ours = [c for c in cells if c["data"] == name and tuple(c.get("overrides", ())) == overrides]
        study = [c for c in ours if c["condition"] == "study"]
        rand = [c for c in ours if c["condition"] == "random"]
        if not study:
            continue

        def test(cs: list[dict[str, Any]], which: str) -> str:
            return stat([(role(c, which) or {}).get("test_acc_mean") for c in cs])

        recipe_won = sum(c["single_run_best"] == (role(c, "recipe") or {}).get("trial") for c in study)
        label = " ".join([name, *overrides])
        lines.append(f"| {label} | {len(study)} | {study[0]['budget_s']:.0f} s | {test(study, 'baseline')} | "
                     f"{test(study, 'recipe')} | {test(study, 'winner')} | {test(rand, 'winner')} | "
                     f"{count(study)} / {count(rand)} | "
                     f"{recipe_won}/{len(study)} | {stat([c['hgb_test_acc'] for c in study])} |")
    return lines


def main() -> None:
    ap = common.parser(__doc__, "search_value")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: " + ", ".join(DATASETS))
    ap.add_argument("--seeds", type=int, default=3, help="study seeds (0, 1, ...)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every data set's wall budget")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a study-file override for every cell (to measure a change before making it)")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of earlier results, merged")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        runs = [json.loads(Path(path).read_text()) for path in args.table]
        print("\n".join(table([{**c, "overrides": run.get("overrides", [])} for run in runs for c in run["cells"]])))
        return
    if args.cell:
        name, condition, seed, budget = args.cell.split(",")
        extra = [tuple(pair.split("=", 1)) for pair in args.set]
        print(json.dumps(run_cell(name, condition, int(seed), float(budget), args.quick, extra)))
        return
    names = ["digits"] if args.quick else args.datasets.split(",")
    cells = []
    for name in names:
        budget = 10.0 if args.quick else DATASETS[name]["budget_s"] * args.budget_scale
        for seed in range(1 if args.quick else args.seeds):
            for condition in CONDITIONS:  # side by side: the two searches of one seed run one after the other
                cell = f"{name},{condition},{seed},{budget}"
                print(f"running {cell}", flush=True)
                cells.append(common.run_json([sys.executable, __file__, "--cell", cell, *(["--quick"] if args.quick
                                              else []), *(f"--set={pair}" for pair in args.set)]))
                print("  " + cells[-1]["sentence"], flush=True)
    lines = table([{**c, "overrides": args.set} for c in cells])
    print("\n".join(lines))
    measures = [(f"{c['data']} seed {c['seed']} {c['condition']}: winner's test", common.summary(
        [v for v in role(c, "winner")["test_acc"] if v is not None]), "accuracy") for c in cells]
    common.report("search_value", args, measures, {"table": lines, "overrides": args.set, "cells": cells})


if __name__ == "__main__":
    main()
