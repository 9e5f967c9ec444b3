"""Where the tabular study's networks lose to gradient-boosted trees: duplicates, seeds, and the rest.

For winequality-white (a stratified quarter held out, seed 0) and adult (its own test file), the `tabular` study's
data as regsearch loads it, and three configurations of its MLP trained by regsearch's own trainer with `--seeds`
seeds each: the unregularized baseline, the study's recipe (its `first_trial`), and BatchNorm alone (the finalists
of the search_value runs). Each is scored on the test split one seed at a time and as the average of its seeds'
predicted probabilities (an ensemble). Test rows whose inputs also occur in the training split are scored apart:
a model that memorises its training rows gets them right for free. HistGradientBoostingClassifier (defaults,
the same training split) is the yardstick.

usage: python benchmarks/table_gap.py [--datasets wine,adult] [--seeds 5] [--params NAME=JSON ...]
       [--set KEY=VALUE ...] [--quick]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import search_value  # noqa: E402

RECIPE_OFF = {"batchnorm.enabled": False, "dropout.enabled": False, "l1.enabled": False, "l2.enabled": False,
              "early_stopping.enabled": False, "model.hidden": "[256, 256]"}
CONFIGS = {
    "baseline": {"lr": 2.0e-3, **RECIPE_OFF},
    "recipe": {"lr": 2.0e-3, **RECIPE_OFF, "batchnorm.enabled": True, "dropout.enabled": True, "dropout.p": 0.2,
               "l2.enabled": True, "l2.weight_decay": 1.0e-2},  # the study's first_trial when these were measured
    "batchnorm": {"lr": 2.0e-3, **RECIPE_OFF, "batchnorm.enabled": True},
}


def probabilities(exp: Any, params: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """One training of `params` with `seed` by regsearch's trainer; softmax on the validation and test splits."""
    import optuna
    import torch

    from regsearch._trainer import fit
    from regsearch._trial import build_trial, training_for
    from regsearch.data._tensors import Batcher

    trial = optuna.trial.FixedTrial(params, number=0)
    model, applied, lr = build_trial(exp, trial, seed)
    fit(model, exp.data, applied, training_for(exp, trial), lr=lr, device=exp.device, seed=seed)
    model.eval()
    with torch.no_grad():
        return tuple(model(Batcher(exp.data).inputs(x)).float().softmax(1).cpu()
                     for x in (exp.data.x_val, exp.data.x_test))


def scores(right: Any, seen: Any) -> dict[str, float | None]:
    """Accuracy on all rows, on those whose inputs occur in the training split, and on the rest (None: no rows)."""
    parts = {"all": right, "seen": right[seen], "unseen": right[~seen]}
    return {part: rows.float().mean().item() if len(rows) else None for part, rows in parts.items()}


def f3(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def mean(values: list[float | None]) -> float | None:
    return statistics.fmean(values) if None not in values else None


def sd(values: list[float | None]) -> float | None:
    return statistics.stdev(values) if None not in values and len(values) > 1 else None


def run_table(name: str, seeds: int, quick: bool, extra: list[tuple[str, str]]) -> dict[str, Any]:
    import torch
    from sklearn.ensemble import HistGradientBoostingClassifier

    from regsearch._experiment import prepare
    from regsearch._study_file import load_study
    from regsearch.data.table import seen_rows

    with tempfile.TemporaryDirectory() as folder:
        overrides, _ = search_value.data_overrides(name, Path(folder), quick=False)
        if quick:
            overrides.append(("training.steps", 100))
        overrides += extra
        spec = load_study("tabular", overrides)
        exp = prepare(spec)
    data = exp.data
    x_train, y_val, y_test = data.x_train.cpu(), data.y_val.cpu(), data.y_test.cpu()
    seen_by = dict(zip(("val", "test"), map(torch.from_numpy, seen_rows(x_train, data.x_val, data.x_test))))
    out: dict[str, Any] = {"data": name, "train_rows": len(x_train), "test_rows": len(y_test),
                           "seen_fraction": {k: v.float().mean().item() for k, v in seen_by.items()}, "configs": {}}
    for config, params in CONFIGS.items():
        params = {**RECIPE_OFF, **(params or dict(spec.search.first_trial))}  # keys a --params entry leaves out
        start = time.perf_counter()
        runs = [probabilities(exp, params, seed) for seed in range(seeds)]
        c: dict[str, Any] = {"params": params}
        for split, i, y in (("val", 0, y_val), ("test", 1, y_test)):
            single = [scores(r[i].argmax(1) == y, seen_by[split]) for r in runs]
            c[split] = {"single": single, "single_mean": {k: mean([s[k] for s in single]) for k in single[0]},
                        "single_sd": {k: sd([s[k] for s in single]) for k in single[0]},
                        "ensemble": scores(torch.stack([r[i] for r in runs]).mean(0).argmax(1) == y, seen_by[split])}
        c["wall_s"] = time.perf_counter() - start
        out["configs"][config] = c
        print(f"{name} {config}: val {c['val']['single_mean']} test {c['test']['single_mean']} ensemble "
              f"{c['test']['ensemble']}", flush=True)
    trees = HistGradientBoostingClassifier(random_state=0).fit(x_train.numpy(), data.y_train.cpu().numpy())
    out["hgb"] = scores(torch.from_numpy(trees.predict(data.x_test.cpu().numpy())) == y_test, seen_by["test"])
    out["hgb_val"] = scores(torch.from_numpy(trees.predict(data.x_val.cpu().numpy())) == y_val, seen_by["val"])
    return out


def table(runs: list[dict[str, Any]], seeds: int) -> list[str]:
    lines = [f"| data | rows seen in training: val / test | configuration | val acc: all / unseen rows | test acc: "
             f"one network (mean ± sd of {seeds}) | ensemble of {seeds} | on seen test rows (ensemble) | on unseen "
             "test rows: one network / ensemble |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        share = f"{run['seen_fraction']['val']:.1%} / {run['seen_fraction']['test']:.1%}"
        for config, c in run["configs"].items():
            v, t = c["val"]["single_mean"], c["test"]
            m, s, e = t["single_mean"], t["single_sd"], t["ensemble"]
            lines.append(f"| {run['data']} | {share} | {config} | {f3(v['all'])} / {f3(v['unseen'])} | "
                         f"{f3(m['all'])} ± {f3(s['all'])} | {f3(e['all'])} | {f3(e['seen'])} | "
                         f"{f3(m['unseen'])} / {f3(e['unseen'])} |")
        h, hv = run["hgb"], run["hgb_val"]
        lines.append(f"| {run['data']} | {share} | HistGradientBoosting | {f3(hv['all'])} / {f3(hv['unseen'])} | "
                     f"{f3(h['all'])} | - | {f3(h['seen'])} | {f3(h['unseen'])} |")
    return lines


def main() -> None:
    ap = common.parser(__doc__, "table_gap")
    ap.add_argument("--datasets", default="wine,adult", help="comma-separated: wine, adult")
    ap.add_argument("--seeds", type=int, default=5, help="trainings of each configuration")
    ap.add_argument("--params", action="append", default=[], metavar="NAME=JSON",
                    help="one more configuration: a name and a trial's parameters (a search's winner, say)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a study-file override (to measure a change before making it)")
    args = ap.parse_args()
    seeds = 2 if args.quick else args.seeds
    if not search_value.TABLES.is_dir():
        raise SystemExit(f"the shared tables are not at {search_value.TABLES}")
    for given in args.params:
        name, params = given.split("=", 1)
        CONFIGS[name] = json.loads(params)
    extra = [tuple(pair.split("=", 1)) for pair in args.set]
    runs = [run_table(name, seeds, args.quick, extra) for name in args.datasets.split(",")]
    lines = table(runs, seeds)
    print("\n".join(lines))
    measures = [(f"{r['data']} {k} ensemble test", common.summary([c["test"]["ensemble"]["all"]]), "accuracy")
                for r in runs for k, c in r["configs"].items()]
    common.report("table_gap", args, measures, {"table": lines, "overrides": args.set, "runs": runs})


if __name__ == "__main__":
    main()
