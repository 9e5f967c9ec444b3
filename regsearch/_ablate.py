"""What each regularizer is worth: the confirmed winner retrained without each of its regularizers, and the
baseline with each of them alone, with the confirmation's own seeds (or folds), so every difference is paired.

A regularizer's effect is the mean ± sd of the per-run differences (with it − without it) of val_acc, test_acc
(read only: nothing here chooses) and gap_acc; its verdict on val_acc follows `beyond_noise`. Where removing it
from the winner and adding it to the baseline disagree, what it is worth depends on the others: an interaction.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

from regsearch._errors import ConfigError
from regsearch._records import CONFIRM_ATTR, beyond_noise, is_baseline, is_pareto
from regsearch._search_space import switched_on
from regsearch._spec import StudySpec

logger = logging.getLogger("regsearch")

ABLATION_ATTR = "ablation"
"""A study user attr: the ablation of its confirmed winner (seeds, folds, winner, baseline, rows, sentence)."""

EFFECTS = ("val_acc", "test_acc", "gap_acc")


def refuse_ablation(study: optuna.Study, spec_has_baseline: bool) -> None:
    """Before any training: a pareto study, or one without its unregularized baseline, cannot be ablated."""
    if is_pareto(study):
        raise ConfigError(f"--ablate: study {study.study_name!r} is a pareto study; its confirmation's winner (best "
                          f"mean val_acc) is not what it chose, so ablate a single-objective study")
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not spec_has_baseline or not any(is_baseline(t) for t in trials):
        raise ConfigError(f"--ablate: study {study.study_name!r} has no complete unregularized baseline trial to add "
                          f"each regularizer to (search.baseline: true when the study is made)")
    if all(is_baseline(t) for t in trials):
        raise ConfigError(f"--ablate: study {study.study_name!r} has no regularized configuration, only its "
                          f"baseline: nothing to remove (run more trials first)")


def ablate(study: optuna.Study, spec: StudySpec, train: Callable[..., dict[str, Any]], n_val: int
           ) -> dict[str, Any]:
    """Ablate the study's stored confirmation: 2 × (the winner's regularizers) configurations, each trained by
    `train(trial, on=..., params=...)` as the confirmation trained its rows (`n_val`: validation rows of a run)."""
    done = study.user_attrs.get(CONFIRM_ATTR) or {}
    rows = done.get("rows") or []
    winner = next((r for r in rows if r["winner"]), None)
    base = next((r for r in rows if r["role"] == "baseline"), None)
    if winner is None or base is None:
        raise ConfigError(f"--ablate: study {study.study_name!r} has no confirmation with its baseline to ablate")
    if winner is base:
        raise ConfigError(f"--ablate: the confirmed winner of study {study.study_name!r} is the unregularized "
                          f"baseline (trial {base['trial']}): it has no regularizer to remove (the confirmation is "
                          f"stored)")
    if winner.get("val_acc_mean") is None:
        raise ConfigError(f"--ablate: every run of study {study.study_name!r}'s confirmation diverged: there is no "
                          f"trained winner to ablate (the confirmation is stored)")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    won, baseline = trials[winner["trial"]], trials[base["trial"]]
    names = switched_on(spec.regularizers, won.params)
    if not names:
        raise ConfigError(f"--ablate: the confirmed winner of study {study.study_name!r} (trial {won.number}) has no "
                          f"regularizer to remove")
    logger.info("ablating %s of trial %d of study %s: %d configurations, each as the confirmation was trained",
                ", ".join(names), won.number, study.study_name, 2 * len(names))
    out = []
    for name in names:
        own = {k: v for k, v in won.params.items() if k.startswith(f"{name}.")}
        removed = train(won, on=[n for n in names if n != name], params=dict(won.params))
        added = train(baseline, on=[name], params={**baseline.params, **own})
        rest = {k: v for k, v in won.params.items() if not k.startswith(f"{name}.")}  # what it trained with
        out.append(_ablated(name, "removed", won, removed, winner, removed, rest))
        out.append(_ablated(name, "added", baseline, added, added, base, {**baseline.params, **own}))
    for r in out:
        r["verdict"] = verdict(r, n_val)
    seeds, folds = done["seeds"], done.get("folds")
    return {"seeds": seeds, "folds": folds, "winner": won.number, "baseline": baseline.number, "rows": out,
            "sentence": ablation_sentence(out, won.number, len(seeds), n_val, folds)}


def _ablated(name: str, direction: str, source: optuna.trial.FrozenTrial, runs: Mapping[str, Any],
             with_it: Mapping[str, Any], without: Mapping[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """One ablated configuration's row: its runs and, per metric, the paired effect (with it − without it)."""
    row: dict[str, Any] = {"regularizer": name, "direction": direction, "trial": source.number, "params": params,
                           **runs}
    # a run that diverged has no metrics: counted on its side, left out of the paired differences
    row["diverged_with"] = sum(v is None for v in with_it["val_acc"])
    row["diverged_without"] = sum(v is None for v in without["val_acc"])
    for key in EFFECTS:
        pairs = [(a, b) for a, b in zip(with_it[key], without[key], strict=True) if a is not None and b is not None]
        diffs = [a - b for a, b in pairs]
        row[f"{key}_effect"] = diffs
        row[f"{key}_effect_mean"] = statistics.fmean(diffs) if diffs else None
        row[f"{key}_effect_sd"] = statistics.stdev(diffs) if len(diffs) > 1 else None
    return row


def verdict(row: Mapping[str, Any], n_val: int) -> str:
    """helps, hurts or noise: more runs diverging without it (helps) or with it (hurts); else the val_acc effect
    against `beyond_noise` (its paired sd, one validation example)."""
    with_it, without = row.get("diverged_with", 0), row.get("diverged_without", 0)
    if with_it != without:
        return "helps" if without > with_it else "hurts"
    mean, sd = row["val_acc_effect_mean"], row["val_acc_effect_sd"]
    if mean is None or sd is None and len(row["val_acc"]) > 1:  # one pair left of several: no spread to judge by
        return "noise"
    sd = sd or 0.0
    return "helps" if beyond_noise(mean, sd, n_val) else "hurts" if beyond_noise(-mean, sd, n_val) else "noise"


def diverged_words(row: Mapping[str, Any]) -> str:
    """Where runs diverged on one side of a row more than on the other: how many, in words; else ""."""
    with_it, without = row.get("diverged_with", 0), row.get("diverged_without", 0)
    if with_it == without:
        return ""
    runs = len(row["val_acc"])
    return f"{without} of {runs} runs diverge without it" if without > with_it else \
        f"{with_it} of {runs} runs diverge with it"


def _effect(row: Mapping[str, Any], n_val: int) -> str:
    diverged = diverged_words(row)
    if diverged:
        return f"({diverged}{'' if verdict(row, n_val) == 'helps' else ': hurts here'})"
    if row["val_acc_effect_mean"] is None:
        return "(no run trained on both sides)"
    shown = f"{100 * row['val_acc_effect_mean']:+.1f} ± {100 * (row['val_acc_effect_sd'] or 0.0):.1f}"
    said = {"helps": "", "hurts": " (hurts here)", "noise": " (noise)"}[verdict(row, n_val)]
    return shown + (" points" if not said else "") + said


def ablation_sentence(rows: Sequence[Mapping[str, Any]], winner: int, runs: int, n_val: int,
                      folds: int | None = None) -> str:
    """The ablation in words: each regularizer's val_acc effect when removed from the winner, the largest first,
    with its verdict; then each one whose two directions disagree (an interaction)."""
    removed = sorted((r for r in rows if r["direction"] == "removed"),  # the largest first, a divergence largest
                     key=lambda r: (-abs(r.get("diverged_without", 0) - r.get("diverged_with", 0)),
                                    -abs(r["val_acc_effect_mean"] or 0.0)))
    added = {r["regularizer"]: r for r in rows if r["direction"] == "added"}
    over = f"{runs} seeds" if folds is None else f"{runs} folds"
    sentence = (f"What each regularizer is worth to trial {winner} (val_acc with it − without it, paired over {over}, "
                f"mean ± sd): " + ", ".join(f"{r['regularizer']} {_effect(r, n_val)}" for r in removed) + ".")
    split = [r["regularizer"] for r in removed if verdict(r, n_val) != verdict(added[r["regularizer"]], n_val)]
    if split:
        sentence += " The two directions disagree (an interaction: what it is worth depends on the others) for " + \
            ", ".join(f"{name}: added alone to the baseline, {_effect(added[name], n_val)}" for name in split) + "."
    else:
        sentence += " Added alone to the baseline, each agrees."
    return sentence
