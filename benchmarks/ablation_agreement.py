"""Does an ablation agree with a separate run? Each regularizer of the confirmed winner, added alone to the
baseline, trained again with seeds the ablation never used: its effect (with it − without it, paired on the new
seeds) should fall inside the ablation's own interval, widened by the new run's sd and one validation example.

Digits, a small study (8 trials of 15 epochs), `regsearch confirm --top 2 --seeds 3 --ablate`, then the separate
run with 3 other seeds; `--table wine` or `--table adult` runs the `tabular` study (8 trials) on that shared UCI
table instead, with the study's own 20 trials (wine: a stratified quarter held out as its test file, as in
search_value.py); `--cifar` runs the `cifar` study (its 12-epoch trials, 6 of them) on the CIFAR-10 sample
(`--data`). The removed-from-the-winner direction is reported beside it, not judged: where it differs,
the sentence calls it an interaction.

usage: python benchmarks/ablation_agreement.py [--seeds 3] [--table wine|adult | --cifar]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def main() -> None:
    ap = common.parser(__doc__, "ablation_agreement")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--table", choices=("wine", "adult"), help="the tabular study on this shared table, not digits")
    ap.add_argument("--cifar", action="store_true", help="the cifar study on the CIFAR-10 sample, not digits")
    args = ap.parse_args()
    seeds = 2 if args.quick else args.seeds
    budget = ["--n-trials", "3", "--set", "training.epochs=3", "--set", "data.train_size=300"] if args.quick else [
        "--n-trials", "8", "--set", "training.epochs=15"]
    exe = common.regsearch_exe()
    with tempfile.TemporaryDirectory() as folder:
        folder = os.path.realpath(folder)
        study = ["--study", "digits"]
        if args.table:
            import search_value

            pairs = search_value.data_overrides(args.table, Path(folder), args.quick)[0]
            study = ["--study", "tabular", "--study-name", args.table,
                     *[f"--set={k}={v}" for k, v in pairs], "--set", "search.confirm=null"]
            budget = ["--n-trials", "3", "--set", "training.steps=60"] if args.quick else []  # the shipped 20 trials
        data_dir: list[str] = []
        if args.cifar:
            data_dir = ["--data-dir", str(args.data)]
            study = ["--study", "cifar", "--set", "search.confirm=null"]
            budget = ["--n-trials", "2", "--set", "training.epochs=2", "--set", "data.train_size=400"] if args.quick \
                else ["--n-trials", "6"]
        started = time.perf_counter()
        subprocess.run([exe, "optimize", *study, *budget, *data_dir], cwd=folder, check=True, capture_output=True)
        searched = time.perf_counter() - started
        name = args.table or ("cifar" if args.cifar else "digits")
        started = time.perf_counter()
        done = subprocess.run([exe, "confirm", "--study", name, "--top", "2", "--seeds", str(seeds), "--ablate",
                               *data_dir], cwd=folder, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"regsearch confirm --ablate: {done.stderr.strip()}")
        ablated = time.perf_counter() - started
        os.chdir(folder)
        rows = separate_run(seeds, name, str(args.data) if args.cifar else None)
        os.chdir(common.REPO)
    measures = [("search", common.summary([searched]), "s"), ("confirm + ablate", common.summary([ablated]), "s")]
    for r in rows:
        measures += [(f"{r['regularizer']} added to the baseline (ablation)", common.summary(r["added_runs"]),
                      "val_acc points"),
                     (f"{r['regularizer']} alone, other seeds", common.summary(r["separate_runs"]), "val_acc points")]
    common.report("ablation_agreement", args, measures, {
        "study": f"{name} " + " ".join(budget), "seeds": seeds, "rows": rows,
        "all_agree": all(r["agrees"] for r in rows)})


def separate_run(n: int, name: str, data_dir: str | None) -> list[dict]:
    """Each regularizer of the ablated winner alone against the baseline, on `n` seeds the ablation did not use."""
    import statistics

    from regsearch._ablate import ABLATION_ATTR
    from regsearch._confirm import confirm_seeds, run_plan, trained_runs
    from regsearch._experiment import prepare
    from regsearch._opening import load_stored_study
    from regsearch._question import ask

    question = ask(name)  # the stored study, by its name alone
    study = load_stored_study(name, None)
    exp = prepare(question.spec, data_dir=data_dir)
    done = study.user_attrs[ABLATION_ATTR]
    seeds = [s for s in confirm_seeds(question.spec.seed + 1, n + len(done["seeds"])) if s not in done["seeds"]][:n]
    plan = run_plan(exp, seeds, None)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    won, base = trials[done["winner"]], trials[done["baseline"]]
    baseline = trained_runs(exp, base, seeds, plan)
    one = 1.0 / len(exp.data.y_val)
    out = []
    for name in sorted({r["regularizer"] for r in done["rows"]}):
        own = {k: v for k, v in won.params.items() if k.startswith(f"{name}.")}
        alone = trained_runs(exp, base, seeds, plan, on=[name], params={**base.params, **own})
        diffs = [a - b for a, b in zip(alone["val_acc"], baseline["val_acc"], strict=True)]
        mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        added = next(r for r in done["rows"] if r["regularizer"] == name and r["direction"] == "added")
        removed = next(r for r in done["rows"] if r["regularizer"] == name and r["direction"] == "removed")
        widest = added["val_acc_effect_sd"] + sd + one
        out.append({"regularizer": name, "separate_mean": mean, "separate_sd": sd,
                    "separate_runs": [100 * d for d in diffs], "added_runs": [100 * d for d in added["val_acc_effect"]],
                    "added_mean": added["val_acc_effect_mean"], "added_sd": added["val_acc_effect_sd"],
                    "removed_mean": removed["val_acc_effect_mean"], "removed_sd": removed["val_acc_effect_sd"],
                    "agrees": abs(mean - added["val_acc_effect_mean"]) <= widest})
    return out


if __name__ == "__main__":
    main()
