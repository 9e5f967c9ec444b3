"""What a report reads from a study: one view per trial, the ranking and the header's text lines.

Everything comes from the trials' states, parameters and user attributes (`metrics`, `curve`, `baseline`) and
the study's `best_test`, so a report needs no MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna

from regsearch._ablate import ABLATION_ATTR
from regsearch._records import (
    CONFIRM_ATTR,
    MAX_GAP_ATTR,
    METRIC_ATTR,
    TEST_ATTR,
    best_trial,
    is_baseline,
    is_feasible,
    is_surplus,
    nondominated,
    rank_key,
    trial_curve,
)
from regsearch._reference import REFERENCE_ATTR, reference_summary

STATE = optuna.trial.TrialState


@dataclass
class TrialView:
    """What the report reads from one trial, the same for single- and multi-objective studies."""

    number: int
    state: str
    val_acc: float | None
    gap_acc: float | None
    train_acc: float | None
    params: dict[str, Any]
    distributions: dict[str, optuna.distributions.BaseDistribution]
    curve: list[dict[str, float]]
    baseline: bool
    test_acc: float | None
    """Only the baseline trial has its own test accuracy (the best trial's is the study's `best_test`)."""
    val_loss: float | None = None
    feasible: bool | None = None
    """Under a gap limit (`--max-gap`): whether gap_acc <= the limit; None where the study has no limit."""


@dataclass
class Section:
    """One part of the report: an anchor, a title, a line saying what is drawn (or why nothing is), a figure."""

    key: str
    title: str
    note: str
    png: bytes | None = None
    children: list[Section] = field(default_factory=list)


def trial_views(study: optuna.Study) -> list[TrialView]:
    """Every trial that ran, its accuracies from the `metrics` user attribute (objective values as a fallback)."""
    multi = len(study.directions) > 1
    max_gap = study.user_attrs.get(MAX_GAP_ATTR)
    views = []
    for t in study.get_trials(deepcopy=False):
        if is_surplus(t):
            continue  # asked for after the study had its total (a race between workers): never trained
        metrics = t.user_attrs.get(METRIC_ATTR) or {}
        val, gap = metrics.get("val_acc"), metrics.get("gap_acc")
        if t.state == STATE.COMPLETE and t.values:
            val = val if val is not None else t.values[0]
            if multi and gap is None and len(t.values) > 1:
                gap = t.values[1]
        views.append(TrialView(t.number, t.state.name, as_number(val), as_number(gap),
                               as_number(metrics.get("train_acc")), dict(t.params), dict(t.distributions),
                               trial_curve(t), is_baseline(t),
                               as_number(t.user_attrs.get("test_acc")), as_number(metrics.get("val_loss"))))
        if max_gap is not None:
            views[-1].feasible = is_feasible(t)
    return views


def as_number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def complete_views(views: list[TrialView]) -> list[TrialView]:
    return [v for v in views if v.state == "COMPLETE" and v.val_acc is not None]


def pareto_front(views: list[TrialView]) -> list[TrialView]:
    """The complete trials no other beats on both validation accuracy (higher) and gap (lower), by gap."""
    points = [v for v in complete_views(views) if v.gap_acc is not None]
    front = nondominated(points, lambda v: v.val_acc, lambda v: v.gap_acc)
    return sorted(front, key=lambda v: (v.gap_acc, v.val_acc))


def ranked_views(views: list[TrialView]) -> list[TrialView]:
    """Complete trials, best first, as `optimize` and `show` rank them (`_records.rank_key`)."""
    return sorted(complete_views(views), key=lambda v: rank_key(v.val_acc, v.val_loss, v.feasible, v.number))



def shown(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value)


def summary_lines(study: optuna.Study, views: list[TrialView], top: int = 5) -> list[str]:
    """The header as text: counts by state, the best trial and its test accuracy, the baseline."""
    counts: dict[str, int] = {}
    for v in views:
        counts[v.state] = counts.get(v.state, 0) + 1
    directions = ", ".join(d.name.lower() for d in study.directions)
    lines = ["trials: " + (", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none"),
             "objective: " + ("val_acc (maximize)" if len(study.directions) == 1
                              else f"Pareto front of val_acc and gap_acc ({directions})")
             + (f", subject to gap_acc <= {study.user_attrs[MAX_GAP_ATTR]:g}"
                if study.user_attrs.get(MAX_GAP_ATTR) is not None else "")]
    best = _best(study, views)
    test = study.user_attrs.get(TEST_ATTR) or {}
    if best is not None:
        line = f"best trial {best.number}: val_acc {shown(best.val_acc)}, gap_acc {shown(best.gap_acc)}"
        if test.get("trial") == best.number and test.get("test_acc") is not None:
            line += f", test accuracy {shown(test['test_acc'])} (test split, evaluated once)"
        lines.append(line)
    if test and (best is None or test.get("trial") != best.number) and test.get("test_acc") is not None:
        lines.append(f"test accuracy of trial {test.get('trial')}: {shown(test['test_acc'])}")
    for v in views:
        if v.baseline:
            lines.append(f"baseline (no regularization) trial {v.number}: {v.state.lower()}, val_acc "
                         f"{shown(v.val_acc)}, gap_acc {shown(v.gap_acc)}"
                         + (f", test accuracy {shown(v.test_acc)}" if v.test_acc is not None else ""))
    found = best_trial(study)
    if found is not None:  # the reference beside the network (tables), and what the winner falls below
        tested = test.get("test_acc") if test.get("trial") == found.number else None
        lines += reference_summary(study, study.user_attrs.get(REFERENCE_ATTR), found, tested)
    confirmed = study.user_attrs.get(CONFIRM_ATTR) or {}
    if confirmed.get("sentence"):
        lines.append(confirmed["sentence"])
    if confirmed.get("ensemble"):
        lines.append(confirmed["ensemble"]["sentence"])
    ablated = study.user_attrs.get(ABLATION_ATTR) or {}
    if ablated.get("sentence"):
        lines.append(ablated["sentence"])
    return lines


def _best(study: optuna.Study, views: list[TrialView]) -> TrialView | None:
    """The trial `optimize` tests and logs (`_records.best_trial`), as the report sees it."""
    best = best_trial(study)
    return None if best is None else next((v for v in views if v.number == best.number), None)


def top_table(views: list[TrialView], top: int = 5) -> str:
    """The best complete trials as a plain-text table."""
    rows = ranked_views(views)[:top]
    if not rows:
        return "no complete trials"
    constrained = any(v.feasible is not None for v in rows)
    feasible = "feasible  " if constrained else ""
    out = [f"{'trial':>5}  {'val_acc':>7}  {'gap_acc':>7}  {'train_acc':>9}  {feasible}params"]
    for v in rows:
        params = " ".join(f"{k}={f'{p:.3g}' if isinstance(p, float) else shown(p)}"
                          for k, p in sorted(v.params.items()) if not (k.endswith(".enabled") and not p))
        mark = f"{'yes' if v.feasible else 'no':<8}  " if constrained else ""
        out.append(f"{v.number:>5}  {shown(v.val_acc):>7}  {shown(v.gap_acc):>7}  {shown(v.train_acc):>9}  {mark}"
                   f"{params}{'  (baseline)' if v.baseline else ''}")
    return "\n".join(out)
