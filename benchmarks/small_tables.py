"""Small tables: what the `tabular` study's space, early stopping and a reshuffled split do on 500-5,000 rows.

Data: the shared UCI tables, adult (its own test file) and winequality-white (a stratified quarter held out as
the test file, seed 0), whole, and 1,000-row stratified subsamples of their training files (three subsample
seeds each; the test file stays whole, so a test accuracy is measured on 16,281 or 1,225 rows).

`--mode screen`: configurations of the study's MLP trained by regsearch's own trainer, `--seeds` seeds each, no
search: what early stopping, stronger regularization and a narrower network are worth before any is chosen.
`--mode study`: the `tabular` study searched and confirmed (`search.confirm`) per condition (`--conditions`:
`before`, the space as it was; `fixed`, the shipped study; `reshuffle`, the shipped study with
`search.reshuffle: true`): the confirmed winner's and baseline's test accuracy, HistGradientBoosting and the
majority class on the same split, and the study's wall time.

usage: python benchmarks/small_tables.py [--mode screen|study] [--datasets adult,wine,adult-1k,wine-1k]
       [--subsamples 3] [--seeds 3] [--conditions before,fixed,reshuffle] [--quick]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

TABLES = common.REPO.parent / "shared" / "datasets" / "tabular"
SUBSAMPLE_ROWS = 1_000
OFF = {"batchnorm.enabled": False, "dropout.enabled": False, "l1.enabled": False, "l2.enabled": False,
       "early_stopping.enabled": False, "model.hidden": "[256, 256]"}
RECIPE = {"model.hidden": "[256, 256]", "batchnorm.enabled": True, "dropout.enabled": True, "dropout.p": 0.2,
          "l1.enabled": False, "l2.enabled": True, "l2.weight_decay": 1.0e-2, "early_stopping.enabled": False}
ES = {"early_stopping.enabled": True}
SCREEN: dict[str, tuple[list[tuple[str, Any]], dict[str, Any]]] = {
    "baseline": ([], {"lr": 2.0e-3, **OFF}),
    "baseline, early stopping 25": ([], {"lr": 2.0e-3, **OFF, **ES, "early_stopping.patience": 25}),
    "recipe": ([], {"lr": 2.0e-3, **RECIPE}),
    "recipe, early stopping 25": ([], {"lr": 2.0e-3, **RECIPE, **ES, "early_stopping.patience": 25}),
    "recipe, early stopping 25 on val_loss": ([("regularizers.early_stopping.monitor", "val_loss")], {
        "lr": 2.0e-3, **RECIPE, **ES, "early_stopping.patience": 25}),
    "recipe, early stopping 100": ([], {"lr": 2.0e-3, **RECIPE, **ES, "early_stopping.patience": 100}),
    "dropout 0.5 + wd 0.3": ([("regularizers.l2.weight_decay", [1.0e-5, 1.0])], {
        "lr": 2.0e-3, **RECIPE, "dropout.p": 0.5, "l2.weight_decay": 0.3}),
    "recipe, hidden [64]": ([], {"lr": 2.0e-3, **RECIPE, "model.hidden": "[64]"}),
    "recipe, hidden [512, 512]": ([], {"lr": 2.0e-3, **RECIPE, "model.hidden": "[512, 512]"}),
}
"""Configurations of the shipped space (early stopping with restore_best, the width choices), the recipe being the
study file's first_trial before early stopping joined it."""
CONFIRM = [("search.confirm", {"top": 3, "seeds": 3})]
BEFORE = [("model.hidden", [256, 256]),
          ("regularizers", {"batchnorm": {}, "dropout": {"p": [0.05, 0.5]}, "l1": {"strength": [1.0e-6, 1.0e-3]},
                            "l2": {"weight_decay": [1.0e-5, 1.0e-1]}}),
          ("search.first_trial", {"lr": 2.0e-3, **RECIPE})]
"""The `tabular` study's space before early stopping and the width choices joined it (its confirmation kept)."""
CONDITIONS = {"before": BEFORE, "fixed": [], "reshuffle": [("search.reshuffle", True)]}


def datasets(names: list[str], subsamples: int, tmp: Path) -> dict[str, list[tuple[str, Any]]]:
    """Data set label -> the `--set` pairs that point the `tabular` study at it (files written under `tmp`)."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    wine = pd.read_csv(TABLES / "winequality-white.csv")
    wine_train, wine_test = train_test_split(wine, test_size=0.25, random_state=0, stratify=wine["quality"])
    wine_test.to_csv(tmp / "wine-test.csv", index=False)
    tables = {"adult": (pd.read_csv(TABLES / "adult-train.csv"), TABLES / "adult-test.csv", "income"),
              "wine": (wine_train, tmp / "wine-test.csv", "quality")}
    out: dict[str, list[tuple[str, Any]]] = {}
    for name in names:
        base, _, size = name.partition("-")
        train, test, target = tables[base]
        if not size:
            path = tmp / f"{base}-train.csv"
            train.to_csv(path, index=False)
            out[name] = [("data.path", str(path)), ("data.test_path", str(test)), ("data.target", target)]
            continue
        for s in range(subsamples):
            part = train_test_split(train, train_size=SUBSAMPLE_ROWS, random_state=s, stratify=train[target])[0]
            path = tmp / f"{name}-{s}.csv"
            part.to_csv(path, index=False)
            out[f"{name}/{s}"] = [("data.path", str(path)), ("data.test_path", str(test)), ("data.target", target)]
    return out


def screen_one(data: list[tuple[str, Any]], overrides: list[tuple[str, Any]], params: dict[str, Any],
               seeds: int) -> dict[str, Any]:
    """`params` trained once per seed on the data by regsearch's trainer: val and test accuracy per seed."""
    import optuna

    from regsearch._experiment import prepare
    from regsearch._study_file import load_study
    from regsearch._trainer import fit
    from regsearch._trial import build_trial, test_score, training_for

    spec = load_study("tabular", [*data, ("search.reference", False), *overrides])
    exp = prepare(spec)
    runs = []
    for seed in range(seeds):
        trial = optuna.trial.FixedTrial(params, number=0)
        model, applied, lr = build_trial(exp, trial, seed)
        start = time.perf_counter()
        metrics = fit(model, exp.data, applied, training_for(exp, trial), lr=lr, device=exp.device, seed=seed)
        runs.append({"val_acc": metrics["val_acc"], "test_acc": test_score(exp, model, None)[1],
                     "best_epoch": metrics.get("best_epoch"), "epochs": exp.spec.training.epochs,
                     "seconds": time.perf_counter() - start})
    return {"runs": runs, "val_acc": statistics.fmean(r["val_acc"] for r in runs),
            "test_acc": statistics.fmean(r["test_acc"] for r in runs),
            "test_sd": statistics.stdev(r["test_acc"] for r in runs) if len(runs) > 1 else 0.0}


def study_one(label: str, data: list[tuple[str, Any]], condition: str, tmp: Path, quick: bool) -> dict[str, Any]:
    """The `tabular` study searched and confirmed under `condition`: what a user would read at its end."""
    import regsearch
    from regsearch._opening import load_stored_study
    from regsearch._study_file import load_study

    extra = [("search.n_trials", 3), ("training.steps", 60), ("search.confirm", {"top": 1, "seeds": 2})] if quick \
        else []
    spec = load_study("tabular", [*data, *CONDITIONS[condition], *extra])
    if spec.search.confirm is None:
        spec = load_study("tabular", [*data, *CONDITIONS[condition], *CONFIRM, *extra])
    storage = str(tmp / f"{label.replace('/', '-')}-{condition}.journal")
    start = time.perf_counter()
    regsearch.optimize(spec, storage=storage, tracking=False)
    wall = time.perf_counter() - start
    stored = load_stored_study(spec.name, storage, None)
    confirmed = stored.user_attrs["confirm"]
    rows = {r["role"] if not r["winner"] else "winner": r for r in confirmed["rows"]}
    reference = stored.user_attrs.get("reference") or {}
    pick = ("trial", "role", "config", "val_acc_mean", "val_acc_sd", "test_acc_mean", "test_acc_sd", "test_acc")
    return {"data": label, "condition": condition, "wall_s": wall, "sentence": confirmed["sentence"],
            "winner": {k: rows["winner"].get(k) for k in pick},
            "baseline": {k: rows["baseline"].get(k) for k in pick} if "baseline" in rows else None,
            "hgb_test_acc": reference.get("reference_test_acc"), "majority_test_acc": reference.get("majority_test_acc"),
            "trials": len(stored.trials)}


def write_json(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")


def pm(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def screen_table(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Per configuration: mean test accuracy per data set (subsamples pooled), seeds' sd in brackets."""
    groups = sorted({label.split("/")[0] for label in results})
    lines = ["| configuration | " + " | ".join(f"{g}: val / test" for g in groups) + " |",
             "|---" * (len(groups) + 1) + "|"]
    for config in SCREEN:
        cells = []
        for g in groups:
            cell = [r[config] for label, r in results.items() if label.split("/")[0] == g and config in r]
            cells.append(f"{statistics.fmean(c['val_acc'] for c in cell):.3f} / "
                         f"{pm([c['test_acc'] for c in cell])}" if cell else "-")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return lines


def study_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [("| data | condition | winner (confirmed) | winner test | baseline test | HGB test | majority | "
              "wall s |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, b = r["winner"], r["baseline"] or {}
        lines.append(f"| {r['data']} | {r['condition']} | {w['config']} | {w['test_acc_mean']:.3f} ± "
                     f"{w['test_acc_sd'] or 0:.3f} | " + (f"{b['test_acc_mean']:.3f} ± {b['test_acc_sd'] or 0:.3f}"
                                                        if b else "-")
                     + f" | {r['hgb_test_acc'] or float('nan'):.3f} | {r['majority_test_acc'] or float('nan'):.3f}"
                     f" | {r['wall_s']:.0f} |")
    return lines


def main() -> None:
    ap = common.parser(__doc__, "small_tables")
    ap.add_argument("--mode", choices=("screen", "study"), default="study")
    ap.add_argument("--datasets", default="adult,wine,adult-1k,wine-1k")
    ap.add_argument("--subsamples", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--conditions", default="before,fixed,reshuffle")
    ap.add_argument("--configs", default=";".join(SCREEN), help="screen mode: which configurations, ;-separated")
    args = ap.parse_args()
    if args.quick:
        args.datasets, args.subsamples, args.seeds, args.conditions = "wine-1k", 1, 2, "reshuffle"
    if args.out == str(common.RESULTS / "small_tables.json"):
        args.out = str(common.RESULTS / f"small_tables_{args.mode}.json")
    with common.temp_dir() as folder:
        tmp = Path(folder)
        data = datasets(args.datasets.split(","), args.subsamples, tmp)
        if args.mode == "screen":
            results = screen(data, args)
            lines = screen_table(results)
            seconds = [r["seconds"] for by_config in results.values() for c in by_config.values() for r in c["runs"]]
            measures = [("one training", common.summary(seconds), "s")]
            extra: dict[str, Any] = {"results": results}
        else:
            rows = []
            for label, pairs in data.items():
                for condition in args.conditions.split(","):
                    rows.append(study_one(label, pairs, condition, tmp, args.quick))
                    print(label, condition, f"{rows[-1]['winner']['test_acc_mean']:.3f}",
                          f"{rows[-1]['wall_s']:.0f}s", flush=True)
                    write_json(Path(args.out), {"partial": True, "rows": rows})  # a long run keeps what it has
            lines = study_table(rows)
            measures = [(f"study wall time ({c})", common.summary([r["wall_s"] for r in rows if r["condition"] == c]),
                         "s") for c in args.conditions.split(",")]
            extra = {"rows": rows}
    print("\n".join(lines))
    common.report("small_tables", args, measures, {**extra, "mode": args.mode, "table": lines})


def screen(data: dict[str, list[tuple[str, Any]]], args: Any) -> dict[str, dict[str, Any]]:
    configs = list(SCREEN)[:2] if args.quick else [c for c in SCREEN if c in args.configs.split(";")]
    results: dict[str, dict[str, Any]] = {}
    for label, pairs in data.items():
        results[label] = {}
        for config in configs:
            overrides, params = SCREEN[config]
            if args.quick:
                overrides = [*overrides, ("training.steps", 100)]
            results[label][config] = screen_one(pairs, overrides, params, args.seeds)
            print(label, config, f"{results[label][config]['test_acc']:.3f}", flush=True)
    return results


if __name__ == "__main__":
    main()
