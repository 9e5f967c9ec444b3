"""A stored trial as everyone reads it: field names, readers, the one ranking, the Pareto front, the run status.

`show`, `report`, `sync`, the tracker and `optimize` all read trials through this module, so that "the best trial",
"feasible" and "how a trial ended" mean the same everywhere.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import optuna

from regsearch._search_space import switched_on
from regsearch._spec import StudySpec

COMPLETE = optuna.trial.TrialState.COMPLETE
PRUNED = optuna.trial.TrialState.PRUNED
FAIL = optuna.trial.TrialState.FAIL
RUNNING = optuna.trial.TrialState.RUNNING
FINISHED = (COMPLETE, PRUNED)
"""Trials that count toward `n_trials` (failed ones are retried, not counted)."""

WORKER_ATTR = "worker"
SURPLUS = "surplus: the study already had its total when this trial started"
METRIC_ATTR = "metrics"
FAIL_REASON_ATTR = "fail_reason"
TEST_ATTR = "best_test"
CURVE_ATTR = "curve"
"""Per-epoch eval-mode metrics of a trial, for reports without MLflow: one user attribute per epoch,
`curve.<epoch>`, written once when the epoch ends (studies stored before held one list under `curve` itself)."""
TRAIN_SECONDS_ATTR = "train_s"
"""Seconds a trial spent in the trainer (its per-epoch evaluation included), beside its wall time."""
BASELINE_ATTR = "baseline"
"""True on the study's unregularized baseline trial (every regularizer off)."""
TEST_ACC_ATTR = "test_acc"
"""The baseline trial's test accuracy (the best trial's is the study's `best_test`)."""
PRECISION_ATTR = "precision"
"""A trial's user attribute (and MLflow parameter): the precision it trained in, float32 or bfloat16."""
RUN_ID_ATTR = "mlflow_run_id"
SUMMARY_ATTR = "summary"
"""The study's finding in one sentence (a study user attr, printed by `optimize` and `show`)."""
OBJECTIVE_ATTR = "regsearch.objective"
"""The study's objective (`val_acc` or `pareto`), fixed when the study is created."""
MAX_GAP_ATTR = "regsearch.max_gap"
"""The study's gap constraint (gap_acc <= max_gap; None: none), fixed when the study is created."""
GAP_CONSTRAINT = "gap_acc"
"""The Optuna constraint key of a trial: gap_acc - max_gap (feasible when <= 0)."""
INTERRUPTED = "interrupted"
CONFIRM_ATTR = "confirm"
"""A study user attr: the confirmation of its finalists with fresh seeds (`regsearch.confirm`): seeds, rows,
sentence."""

T = TypeVar("T")


def is_pareto(study: optuna.Study) -> bool:
    """Whether the study has two objectives (val_acc up, gap_acc down)."""
    return len(study.directions) > 1


def study_max_gap(study: optuna.Study) -> float | None:
    return study.user_attrs.get(MAX_GAP_ATTR)


def metrics(trial: Any) -> dict[str, float]:
    return trial.user_attrs.get(METRIC_ATTR) or {}


def trial_val_acc(trial: optuna.trial.FrozenTrial) -> float | None:
    """The trial's validation accuracy: its (first) objective value, else its last metrics (pruned trials)."""
    if trial.values:
        return trial.values[0]
    return metrics(trial).get("val_acc")


def trial_gap_acc(trial: optuna.trial.FrozenTrial) -> float | None:
    if trial.values and len(trial.values) > 1:
        return trial.values[1]
    return metrics(trial).get("gap_acc")


def curve_key(epoch: int) -> str:
    """The user attribute holding one epoch's metrics: a record per epoch, so a trial's bytes grow with its epochs."""
    return f"{CURVE_ATTR}.{epoch}"


def trial_curve(trial: Any) -> list[dict[str, float]]:
    """A trial's per-epoch metrics in epoch order, each with its `epoch` (a stored list, as older studies kept it,
    read as well)."""
    attrs = trial.user_attrs
    rows = {int(key[len(CURVE_ATTR) + 1:]): value for key, value in attrs.items()
            if key.startswith(f"{CURVE_ATTR}.") and key[len(CURVE_ATTR) + 1:].isdigit()}
    for row in attrs.get(CURVE_ATTR) or ():
        rows.setdefault(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})
    return [{"epoch": epoch, **rows[epoch]} for epoch in sorted(rows)]


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Optuna's rule: every constraint value <= 0 (a trial without constraints is feasible)."""
    return all(v <= 0.0 for v in trial.constraints.values())


def is_baseline(trial: Any) -> bool:
    """Whether a trial (frozen or running) is the study's unregularized baseline."""
    return bool(getattr(trial, "user_attrs", {}).get(BASELINE_ATTR))


def is_surplus(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial asked for after the study had its total (a race between workers): never trained, never shown."""
    return trial.user_attrs.get(FAIL_REASON_ATTR) == SURPLUS


def rank_key(val_acc: float | None, val_loss: float | None, feasible: bool | None, number: int,
             gap_acc: float | None = None) -> tuple:
    """The one ranking (smaller is better): feasible first, higher val_acc, then (pareto studies) the lower gap,
    then the lower val_loss, then the earlier trial. A tie in val_acc is never decided by trial order alone."""
    return (feasible is False, -(val_acc if val_acc is not None else -math.inf),
            gap_acc if gap_acc is not None else 0.0,
            val_loss if val_loss is not None and math.isfinite(val_loss) else math.inf, number)


def trial_rank(trial: optuna.trial.FrozenTrial, constrained: bool, pareto: bool = False) -> tuple:
    return rank_key(trial_val_acc(trial), metrics(trial).get("val_loss"),
                    is_feasible(trial) if constrained else None, trial.number,
                    trial_gap_acc(trial) if pareto else None)


def nondominated(points: Iterable[T], val: Callable[[T], float], gap: Callable[[T], float]) -> list[T]:
    """The points no other beats on both val (higher) and gap (lower): the Pareto front."""
    points = list(points)
    return [p for p in points
            if not any(val(q) >= val(p) and gap(q) <= gap(p) and (val(q) > val(p) or gap(q) < gap(p))
                       for q in points)]


def _front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
                if t.values and len(t.values) > 1 and is_feasible(t)]
    return nondominated(complete, lambda t: t.values[0], lambda t: t.values[1])


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial regsearch reports, tests and logs; None when no complete trial qualifies.

    Single objective: the first by `rank_key` among feasible complete trials. Pareto: the front's first by
    `rank_key` (the front holds feasible trials only).
    """
    constrained, pareto = study_max_gap(study) is not None, is_pareto(study)
    if pareto:
        pool = _front(study)
    else:
        pool = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
                if t.values and (not constrained or is_feasible(t))]
    return min(pool, key=lambda t: trial_rank(t, constrained, pareto)) if pool else None


def pareto_front(study: optuna.Study) -> list[dict[str, Any]]:
    """The Pareto front, highest val_acc first: trial, val_acc, gap_acc, params."""
    front = sorted(_front(study), key=lambda t: (-t.values[0], t.values[1], t.number))
    return [{"trial": t.number, "val_acc": t.values[0], "gap_acc": t.values[1], "params": t.params} for t in front]


def leaderboard(study: optuna.Study, top: int = 5) -> list[dict[str, Any]]:
    """The best finished trials, best first: number, state, val_acc, gap_acc, train_acc, feasible, params.

    Complete trials come first, ranked by `rank_key`; `feasible` is None in a study without a gap constraint.
    """
    constrained = study_max_gap(study) is not None
    trials = sorted(study.get_trials(deepcopy=False, states=FINISHED),
                    key=lambda t: (t.state != COMPLETE, trial_rank(t, constrained)))
    return [{"number": t.number, "state": t.state.name, "val_acc": trial_val_acc(t), "gap_acc": trial_gap_acc(t),
             "train_acc": metrics(t).get("train_acc"), "epochs": t.user_attrs.get("epochs"),
             "feasible": is_feasible(t) if constrained else None, "params": t.params, "baseline": is_baseline(t)}
            for t in trials[:top]]


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def run_status(state: str, reason: str | None = None, *, killed: bool = False) -> tuple[str, dict[str, str]]:
    """The MLflow end status and `regsearch.state`/`regsearch.reason` tags of a trial that ended in `state`.

    COMPLETE -> FINISHED, PRUNED -> KILLED, FAIL -> FAILED (KILLED when the trial was interrupted or its worker
    `killed`).
    """
    tags = {"regsearch.state": state, **({"regsearch.reason": reason} if reason else {})}
    if state == "COMPLETE":
        return "FINISHED", tags
    if state == "PRUNED":
        return "KILLED", tags
    return ("KILLED" if killed or reason == INTERRUPTED else "FAILED"), tags


def run_outcome(trial: optuna.trial.FrozenTrial) -> tuple[str, dict[str, str]]:
    """`run_status` of a stored trial, with the reason its records give."""
    if trial.state == COMPLETE:
        return run_status("COMPLETE")
    if trial.state == PRUNED:
        epoch = trial.user_attrs.get("epochs") or max(trial.intermediate_values, default=0)
        value = metrics(trial).get("val_acc", trial.intermediate_values.get(epoch))
        return run_status("PRUNED", f"pruned at epoch {epoch}" + (f" (val_acc {value:.4f})" if value is not None
                                                                    else ""))
    return run_status("FAIL", trial.user_attrs.get(FAIL_REASON_ATTR)
                      or "failed without a reason (its worker may have died)")


def combination(spec: StudySpec, trial: optuna.trial.FrozenTrial) -> list[str]:
    """The regularizers a trial switched on, each with its own searched values: ["l2(weight_decay=0.0004)", ...]."""
    if is_baseline(trial):
        return []
    on = []
    for name in switched_on(spec.regularizers, trial.params):
        own = {k[len(name) + 1:]: v for k, v in trial.params.items() if k.startswith(f"{name}.")
               and k != f"{name}.enabled"}
        values = ", ".join(_setting(k, v) for k, v in sorted(own.items()) if not isinstance(v, bool))
        if not values:  # only its own switches (dropout's sites): say them, "dropout" alone hides that all are off
            values = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in sorted(own.items()))
        on.append(f"{name}({values})" if values else name)
    return on


def _setting(key: str, value: Any) -> str:
    """`key=value`, a float to three significant digits."""
    return f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"


def configuration(spec: StudySpec, trial: optuna.trial.FrozenTrial) -> str:
    """A trial's regularizers (`combination`) and its values of the study's searched `model.*`/`training.*` keys
    (not the learning rate, searched in every study): two configurations of different widths read differently."""
    found = " + ".join(combination(spec, trial)) or "no regularizer"
    keys = [_setting(k, v) for k, v in sorted(trial.params.items()) if k.startswith(("model.", "training."))]
    return found + (f" with {'; '.join(keys)}" if keys else "")


def summary_sentence(study: optuna.Study, spec: StudySpec, best: optuna.trial.FrozenTrial,
                     test_acc: float | None) -> str:
    """What the study found, in words: the best combination, its test accuracy and gap against the baseline."""
    found_metrics = metrics(best)
    found = configuration(spec, best)
    score = (f"test accuracy {test_acc:.3f}" if test_acc is not None
             else f"validation accuracy {found_metrics.get('val_acc', float('nan')):.3f}")
    gap = found_metrics.get("gap_acc")
    sentence = (f"Best combination (trial {best.number}): {found} - {score}"
                + (f", generalization gap {gap:.3f}" if gap is not None else ""))
    baseline = next((t for t in study.get_trials(deepcopy=False, states=(COMPLETE,)) if is_baseline(t)), None)
    if baseline is None or baseline.number == best.number:
        return sentence + ("; it is the unregularized baseline itself." if baseline is not None else ".")
    base = metrics(baseline)
    base_test = baseline.user_attrs.get(TEST_ACC_ATTR)
    parts = [f"test accuracy {base_test:.3f}" if base_test is not None and test_acc is not None
             else f"validation accuracy {base['val_acc']:.3f}" if "val_acc" in base else None,
             f"gap {base['gap_acc']:.3f}" if "gap_acc" in base else None]
    return sentence + f"; the unregularized baseline (trial {baseline.number}): " + ", ".join(
        p for p in parts if p) + "."


def beyond_noise(difference: float, spread: float, n_val: int) -> bool:
    """Whether a mean difference in validation accuracy is more than noise: it exceeds the standard deviation of
    the difference (`paired_sd`) and one validation example (1 / n_val), whichever is larger."""
    return difference > max(spread, 1.0 / max(n_val, 1))


def paired_sd(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The sd of two confirmed configurations' per-run val_acc differences: both ran with the same seeds (and
    folds), so what a seed or a fold does to every configuration cancels. Rows without per-run values fall back
    to the unpaired √(sd_a² + sd_b²)."""
    runs_a, runs_b = a.get("val_acc") or [], b.get("val_acc") or []
    if len(runs_a) == len(runs_b) >= 2 and None not in runs_a and None not in runs_b:
        return statistics.stdev(x - y for x, y in zip(runs_a, runs_b))
    return math.hypot(a["val_acc_sd"] or 0.0, b["val_acc_sd"] or 0.0)


def confirm_method(runs: int, folds: int | None) -> str:
    """How a confirmation trained each configuration, in words ("3 fresh seeds", "5-fold cross-validation")."""
    if not folds:
        return f"{runs} fresh seeds"
    return f"{folds}-fold cross-validation" + (f" repeated {runs // folds} times" if runs > folds else "")


def confirm_sentence(rows: list[dict[str, Any]], runs: int, n_val: int, folds: int | None = None) -> str:
    """The confirmation in words: the winner on mean val_acc, and whether a searched configuration beats the
    recipe (else the baseline) beyond noise (`beyond_noise`); differences in points, ± their sd (`paired_sd`).
    `runs`: trainings per configuration (seeds, or folds × repeats); `n_val`: validation rows of one run."""
    winner = next(r for r in rows if r["winner"])
    test = (f" (test {winner['test_acc_mean']:.3f} ± {winner['test_acc_sd'] or 0.0:.3f})"
            if winner.get("test_acc_mean") is not None else "")
    over = f"{runs} seeds" if folds is None else f"{runs} folds" if runs == folds else \
        f"{runs} folds ({runs // folds} × {folds}-fold)"
    method = f"{runs} fresh seeds" if folds is None else over
    if winner["val_acc_mean"] is None:
        return f"Confirmed over {method}: every run of every configuration diverged; nothing is confirmed."
    sentence = (f"Confirmed over {method} (mean ± sd): {_who(winner)} has the best mean validation accuracy, "
                f"{winner['val_acc_mean']:.3f} ± {winner['val_acc_sd'] or 0.0:.3f}{test}")
    if winner.get("diverged"):
        sentence += f", though {winner['diverged']} of its {runs} runs diverged, as every configuration's did"
    lost = [r for r in rows if r.get("diverged")]
    if lost:
        sentence += " (runs that diverged: " + ", ".join(f"trial {r['trial']} {r['diverged']} of {runs}"
                                                         for r in lost) + ")"
    reference = next((r for r in rows if r["role"] == "recipe"), None) or next(
        (r for r in rows if r["role"] == "baseline"), None)
    searched = [r for r in rows if r["role"] == "searched"]  # rows come best first
    if reference is None or not searched:
        return sentence + "."
    named = "the recipe" if reference["role"] == "recipe" else "the unregularized baseline"
    if reference.get("diverged") or searched[0].get("diverged"):  # a mean of the runs that trained compares nothing
        return sentence + f"; no searched configuration is compared with {named} where runs diverged."
    best = searched[0]
    points = 100 * (best["val_acc_mean"] - reference["val_acc_mean"])
    spread = 100 * paired_sd(best, reference)
    if beyond_noise(points / 100, spread / 100, n_val):
        return sentence + (f"; trial {best['trial']} ({best['config']}) beats {named} (trial {reference['trial']}) "
                           f"by {points:.1f} ± {spread:.1f} points over {over}.")
    return sentence + (f"; no searched configuration beats {named} (trial {reference['trial']}) beyond noise (the "
                       f"best, trial {best['trial']}: {points:+.1f} ± {spread:.1f} points over {over}).")


def _who(row: dict[str, Any]) -> str:
    if row["role"] == "recipe":
        return f"the recipe (trial {row['trial']}, {row['config']})"
    if row["role"] == "baseline":
        return f"the unregularized baseline (trial {row['trial']})"
    return f"trial {row['trial']} ({row['config']})"
