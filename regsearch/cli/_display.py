"""What the CLI shows: a progress bar while a study runs, and the leaderboard."""

from __future__ import annotations

import sys
from typing import Any

import click
import optuna

from regsearch._ablate import ABLATION_ATTR
from regsearch._records import (
    CONFIRM_ATTR,
    FAIL_REASON_ATTR,
    SUMMARY_ATTR,
    TEST_ATTR,
    best_trial,
    confirm_method,
    is_pareto,
    leaderboard,
    pareto_front,
    state_counts,
    study_max_gap,
    trial_val_acc,
)


class TqdmProgress:
    """One bar for the study's finished trials, with the best (feasible; pareto: front) val_acc so far."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, study_name: str, finished: int, total: float) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=min(finished, total), desc=study_name, unit="trial",
                        file=sys.stderr, dynamic_ncols=True, leave=True)

    def trial_done(self, trial: optuna.trial.FrozenTrial, study: optuna.Study) -> None:
        if self.bar is None:
            return
        if trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            self.bar.update(1)
        best = best_trial(study)
        if best is not None:
            self.bar.set_postfix_str(f"best val_acc {trial_val_acc(best):.4f}")
        if trial.state == optuna.trial.TrialState.FAIL:
            self.bar.write(f"trial {trial.number} failed: {trial.user_attrs.get(FAIL_REASON_ATTR, '?')}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _params(params: dict[str, Any]) -> str:
    shown = []
    for key, value in sorted(params.items()):
        if key.endswith(".enabled") and not value:
            continue
        shown.append(f"{key}={_fmt(value)}")
    return " ".join(shown)


def print_leaderboard(study: optuna.Study, top: int = 5, front_top: int | None = None) -> None:
    """The study's state counts, its best `top` trials (a pareto study: its front, the best `front_top` of it
    by val_acc, all without it) and the tested trial."""
    counts = state_counts(study)
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
    click.echo(f"\nstudy {study.study_name}: {summary}")
    if is_pareto(study):
        _print_front(study, front_top)
        return
    max_gap = study_max_gap(study)
    rows = leaderboard(study, top)
    if not rows:
        return
    if max_gap is not None:
        click.echo(f"gap constraint: gap_acc <= {max_gap:g}; the best trial is the best feasible one")
    feasible = f" {'feasible':>8}" if max_gap is not None else ""
    click.echo(f"{'trial':>5}  {'state':<8} {'val_acc':>7} {'gap_acc':>7}{feasible} {'train_acc':>9}  params")
    for r in rows:
        mark = f" {'yes' if r['feasible'] else 'no':>8}" if max_gap is not None else ""
        click.echo(f"{r['number']:>5}  {r['state']:<8} {_fmt(r['val_acc']):>7} {_fmt(r['gap_acc']):>7}{mark} "
                   f"{_fmt(r['train_acc']):>9}  {'baseline: ' if r['baseline'] else ''}{_params(r['params'])}")
    if max_gap is not None and counts.get("COMPLETE") and best_trial(study) is None:
        click.echo(f"no complete trial has gap_acc <= {max_gap:g}: no best trial, nothing evaluated on the test "
                   f"split (a larger --max-gap, or more trials, may find one)")
        return
    _print_test(study)



def print_mlflow_links(study: optuna.Study, tracking_uri: str | None) -> None:
    """Where MLflow holds the study: the best model's URI, the study run's page on a server (else its id and how to
    see it with `mlflow ui`)."""
    from regsearch._storage import mask_url
    from regsearch.tracking._store import MODEL_ATTR, PARENT_RUN_ATTR, default_tracking_uri

    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if not run_id:
        return
    model = study.user_attrs.get(MODEL_ATTR) or {}
    if model.get("run_id") == run_id:
        which = f"; the ensemble of trial {model['trial']}'s {model['ensemble']} models" if model.get("ensemble") else ""
        click.echo(f"best model: {model['uri']} (mlflow.pyfunc.load_model{which})")
    uri = mask_url(tracking_uri or default_tracking_uri())
    if uri.startswith(("http://", "https://")) and model.get("experiment_id"):
        click.echo(f"study run: {uri.rstrip('/')}/#/experiments/{model['experiment_id']}/runs/{run_id}")
    elif uri.startswith(("http://", "https://")):
        click.echo(f"study run: {run_id} on {uri}")
    else:
        click.echo(f"study run: {run_id} (to browse it: mlflow ui --backend-store-uri {uri})")


def _print_front(study: optuna.Study, top: int | None) -> None:
    front = pareto_front(study)
    if not front:
        return
    top = top or len(front)
    click.echo(f"Pareto front (maximize val_acc, minimize gap_acc): {len(front)} trial{'s' * (len(front) != 1)}"
               + (f", the {top} with the highest val_acc shown (--top {len(front)} shows all)" if len(front) > top
                  else ""))
    click.echo(f"{'trial':>5}  {'val_acc':>7} {'gap_acc':>7}  params")
    for r in front[:top]:
        click.echo(f"{r['trial']:>5}  {_fmt(r['val_acc']):>7} {_fmt(r['gap_acc']):>7}  {_params(r['params'])}")
    _print_test(study, " (the front's best val_acc)")


def _print_test(study: optuna.Study, which: str = "") -> None:
    test = study.user_attrs.get(TEST_ATTR)
    if test:
        click.echo(f"best trial {test['trial']}{which}: test accuracy {test['test_acc']:.4f} (test split, "
                   f"evaluated once)")
    if study.user_attrs.get(SUMMARY_ATTR):
        click.echo(study.user_attrs[SUMMARY_ATTR])
    print_confirmation(study)


def print_confirmation(study: optuna.Study) -> None:
    """The study's confirmation with fresh seeds, if it has one: a row per configuration and its sentence."""
    done = study.user_attrs.get(CONFIRM_ATTR)
    if not done:
        return

    def stat(row: dict[str, Any], key: str) -> str:
        mean, sd = row.get(f"{key}_mean"), row.get(f"{key}_sd")
        return "-" if mean is None else f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"

    how = confirm_method(len(done["seeds"]), done.get("folds"))
    click.echo(f"\nconfirmed with {how} (mean ± standard deviation; * chosen on mean val_acc, test read only):")
    click.echo(f"{'trial':>6}  {'role':<8}  {'val_acc':<13}  {'test_acc':<13}  {'gap_acc':<13}  configuration")
    for r in done["rows"]:
        click.echo(f"{'*' if r['winner'] else ' '}{r['trial']:>5}  {r['role']:<8}  {stat(r, 'val_acc'):<13}  "
                   f"{stat(r, 'test_acc'):<13}  {stat(r, 'gap_acc'):<13}  {r['config']}")
    click.echo(done["sentence"])
    if done.get("ensemble"):
        click.echo(done["ensemble"]["sentence"])
    print_ablation(study)


def print_ablation(study: optuna.Study) -> None:
    """The study's ablation of its confirmed winner, if it has one: a row per regularizer and direction."""
    done = study.user_attrs.get(ABLATION_ATTR)
    if not done:
        return

    def effect(row: dict[str, Any], key: str) -> str:
        mean, sd = row.get(f"{key}_effect_mean"), row.get(f"{key}_effect_sd")
        return "-" if mean is None else f"{100 * mean:+.1f} ± {100 * (sd or 0.0):.1f}"

    click.echo(f"\nwhat each regularizer is worth, with it − without it (points, mean ± sd of paired differences "
               f"over the confirmation's {confirm_method(len(done['seeds']), done.get('folds'))}; test read only):")
    click.echo(f"{'regularizer':<12}  {'direction':<24}  {'val_acc':<12}  {'test_acc':<12}  {'gap_acc':<12}  verdict")
    for r in done["rows"]:
        where = (f"removed from trial {r['trial']}" if r["direction"] == "removed"
                 else f"added to baseline {r['trial']}")
        click.echo(f"{r['regularizer']:<12}  {where:<24}  {effect(r, 'val_acc'):<12}  {effect(r, 'test_acc'):<12}  "
                   f"{effect(r, 'gap_acc'):<12}  {r['verdict']}")
    click.echo(done["sentence"])
