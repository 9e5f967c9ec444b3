"""What the CLI shows: a progress bar while a study runs, and the leaderboard."""

from __future__ import annotations

import sys
from typing import Any

import click
import optuna

from regsearch._study import FAIL_REASON_ATTR, SUMMARY_ATTR, TEST_ATTR, leaderboard, state_counts


class TqdmProgress:
    """One bar for the study's finished trials, with the best validation accuracy so far."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, study_name: str, finished: int, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=min(finished, total), desc=study_name, unit="trial",
                        file=sys.stderr, dynamic_ncols=True, leave=True)

    def trial_done(self, trial: optuna.trial.FrozenTrial, study: optuna.Study) -> None:
        if self.bar is None:
            return
        if trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            self.bar.update(1)
        try:
            self.bar.set_postfix_str(f"best val_acc {study.best_value:.4f}")
        except ValueError:
            pass
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


def print_leaderboard(study: optuna.Study, top: int = 5) -> None:
    counts = state_counts(study)
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
    click.echo(f"\nstudy {study.study_name}: {summary}")
    rows = leaderboard(study, top)
    if not rows:
        return
    click.echo(f"{'trial':>5}  {'state':<8} {'val_acc':>7} {'gap_acc':>7} {'train_acc':>9}  params")
    for r in rows:
        click.echo(f"{r['number']:>5}  {r['state']:<8} {_fmt(r['val_acc']):>7} {_fmt(r['gap_acc']):>7} "
                   f"{_fmt(r['train_acc']):>9}  {'baseline: ' if r['baseline'] else ''}{_params(r['params'])}")
    test = study.user_attrs.get(TEST_ATTR)
    if test:
        click.echo(f"best trial {test['trial']}: test accuracy {test['test_acc']:.4f} (test split, evaluated once)")
    if study.user_attrs.get(SUMMARY_ATTR):
        click.echo(study.user_attrs[SUMMARY_ATTR])
