"""A reference beside the network on a table: gradient-boosted trees and the majority class, on the same split.

A network that tests below HistGradientBoosting (seconds to fit) or below the majority-class rate is not worth
its search on that table; the user is told so beside the winner.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna

from regsearch._spec import StudySpec
from regsearch.data._tensors import TensorData

REFERENCE_ATTR = "reference"
"""A study user attr: HistGradientBoosting's and the majority class's accuracy on the validation and test splits."""

METRICS = ("reference_val_acc", "reference_test_acc", "majority_val_acc", "majority_test_acc")


def wants_reference(spec: StudySpec) -> bool:
    """Tables only (trees on pixels say little), and only while `search.reference` is on."""
    return spec.data.name == "table" and spec.search.reference


def fit_reference(data: TensorData, seed: int) -> dict[str, Any]:
    """HistGradientBoostingClassifier (default settings, `random_state=seed`) fitted on the training split's
    preprocessed inputs, the very rows and columns the network trains on; and the training split's majority class.
    Accuracy on validation and test (None without a test split)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x_train, y_train = _numpy(data.x_train), _numpy(data.y_train)
    model = HistGradientBoostingClassifier(random_state=seed).fit(x_train, y_train)
    majority = int(np.bincount(y_train).argmax())
    found: dict[str, Any] = {"model": "HistGradientBoostingClassifier", "random_state": seed,
                             "majority_class": majority, "train_rows": len(y_train)}
    for split, x, y in (("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test)):
        if y is None:
            found[f"reference_{split}_acc"] = found[f"majority_{split}_acc"] = None
            continue
        y = _numpy(y)
        found[f"reference_{split}_acc"] = float((model.predict(_numpy(x)) == y).mean())
        found[f"majority_{split}_acc"] = float((y == majority).mean())
    return found


def _numpy(x: Any) -> np.ndarray:
    array = x.detach().cpu().numpy()
    return array.reshape(len(array), -1) if array.ndim > 1 else array


def stored_reference(study: optuna.Study, spec: StudySpec, data: TensorData) -> dict[str, Any] | None:
    """The study's reference, fitted once and stored (a resumed study reads it back); None where it is off."""
    if not wants_reference(spec):
        return None
    found = study.user_attrs.get(REFERENCE_ATTR)
    if found is None:
        found = fit_reference(data, spec.seed)
        study.set_user_attr(REFERENCE_ATTR, found)
    return found


def reference_metrics(found: dict[str, Any] | None) -> dict[str, float]:
    """The reference's accuracies as MLflow metrics of the study's parent run (those it has)."""
    return {k: float(found[k]) for k in METRICS if found and found.get(k) is not None}


def reference_line(found: dict[str, Any]) -> str:
    """The reference in one line: HistGradientBoosting's and the majority class's validation (and test) accuracy."""
    def pair(kind: str) -> str:
        test = found.get(f"{kind}_test_acc")
        return f"validation {found[f'{kind}_val_acc']:.3f}" + (f", test {test:.3f}" if test is not None else "")

    return (f"Reference on the same training split: HistGradientBoosting {pair('reference')}; the majority class "
            f"{pair('majority')}.")


def below_line(found: dict[str, Any], winner: float | None, baseline: float | None, split: str) -> str | None:
    """One line naming what the winner's `split` accuracy falls below (the baseline, the majority class, the
    reference), or None where it falls below none of them."""
    if winner is None:
        return None
    others = [("the unregularized baseline", baseline), ("the majority class", found.get(f"majority_{split}_acc")),
              ("HistGradientBoosting", found.get(f"reference_{split}_acc"))]
    below = [f"{name} ({value:.3f})" for name, value in others if value is not None and winner < value]
    if not below:
        return None
    return f"Warning: the winner's {split} accuracy {winner:.3f} is below " + ", ".join(below) + "."


def reference_summary(study: optuna.Study, found: dict[str, Any] | None, best: optuna.trial.FrozenTrial,
                      test_acc: float | None) -> list[str]:
    """The lines after the summary sentence: the reference, and (where it holds) what the winner falls below, on
    the test split (without one: on validation)."""
    from regsearch._records import COMPLETE, TEST_ACC_ATTR, is_baseline, trial_val_acc

    if found is None:
        return []
    baseline = next((t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
                     if is_baseline(t) and t.number != best.number), None)
    if test_acc is not None:
        winner, split = test_acc, "test"
        base = baseline.user_attrs.get(TEST_ACC_ATTR) if baseline is not None else None
    else:
        winner, split = trial_val_acc(best), "val"
        base = trial_val_acc(baseline) if baseline is not None else None
    warning = below_line(found, winner, base, split)
    return [reference_line(found)] + ([warning] if warning else [])
