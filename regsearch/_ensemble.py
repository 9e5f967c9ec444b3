"""The confirmed winner's models used together: their averaged probabilities, the study's model when they beat one
model beyond noise.

A confirmation by seeds trains the winner N times on the study's own split. Averaging the N networks' softmax
often buys a point, for N forward passes per prediction. Whether it is worth it is decided on validation with the
confirmation's own noise rule (`ensemble_beats`); test accuracy is measured and reported, never used to choose.
With folds no ensemble is formed: each fold's network trained on the other folds' validation rows, so no split
is left to measure the ensemble on.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna
import torch
from torch import nn

from regsearch._records import beyond_noise
from regsearch._trainer import evaluate
from regsearch._trial import Experiment, stored_autocast, test_score
from regsearch.data._tensors import Batcher

if TYPE_CHECKING:
    from regsearch.tracking._predictor import Predictor

logger = logging.getLogger("regsearch")

ENSEMBLE_MODEL = "ensemble_model"
"""The name the ensemble is logged under on the study run (the single best model's is `best_model`)."""

NO_ENSEMBLE_WITH_FOLDS = ("no ensemble is formed with folds: each fold's model trained on the other folds' "
                          "validation rows, so the study's model stays the single one")


class ProbabilityAverage(nn.Module):
    """N trained networks as one: the log of their mean softmax. Its argmax is the averaged-probability vote, its
    softmax the averaged probabilities, and cross-entropy on it the ensemble's own loss."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()  # a class no member gives any chance: finite


def ensemble_beats(val_acc: float, member_val_accs: Sequence[float], n_val: int) -> bool:
    """Whether the ensemble beats one model beyond noise: `beyond_noise` on the paired differences, ensemble minus
    each member (their mean is the gain over the members' mean val_acc, their sd the members' own sd)."""
    return beyond_noise(val_acc - statistics.fmean(member_val_accs), statistics.stdev(member_val_accs), n_val)


def form_ensemble(exp: Experiment, trial: optuna.trial.FrozenTrial, row: Mapping[str, Any],
                  models: Sequence[nn.Module]) -> tuple[dict[str, Any], Predictor]:
    """The winner's confirmation models (`models`, one per seed of its confirmation `row`) averaged: the record
    (val_acc and val_loss on the study's validation split, test_acc read only, the gains over one model, the
    decision, the prediction-time ratio, the sentence) and the ensemble's `Predictor` (on the CPU, as logged)."""
    from regsearch.tracking._predictor import Predictor

    autocast = stored_autocast(exp, trial)
    ensemble = ProbabilityAverage(models)
    val_loss, val_acc = evaluate(ensemble, Batcher(exp.data), exp.data.x_val, exp.data.y_val,
                                 exp.spec.training.eval_batch_size, autocast)
    test_acc = test_score(exp, ensemble, autocast)[1] if exp.data.y_test is not None else None
    single, averaged = (Predictor.of(m, exp.data, autocast=autocast, batch_size=exp.spec.training.eval_batch_size)
                        for m in (models[0], ensemble))
    one_test = row.get("test_acc_mean")
    record = {"trial": trial.number, "models": len(models), "val_acc": val_acc, "val_loss": val_loss,
              "test_acc": test_acc, "val_gain": val_acc - row["val_acc_mean"], "val_gain_sd": row["val_acc_sd"],
              "test_gain": None if test_acc is None or one_test is None else test_acc - one_test,
              "beats": ensemble_beats(val_acc, row["val_acc"], len(exp.data.y_val)),
              "predict_time_ratio": predict_time_ratio(exp, single, averaged)}
    record["sentence"] = ensemble_sentence(record)
    return record, averaged


def predict_time_ratio(exp: Experiment, single: Predictor, ensemble: Predictor) -> float:
    """The ensemble's prediction time over one model's: the logged model's forward passes on the validation
    inputs, on the CPU, best of three. The preprocessing, the same for both, is left out: a whole `predict` costs
    at most this ratio more."""
    x = Batcher(exp.data).inputs(exp.data.x_val).cpu()
    seconds = []
    for predictor in (single, ensemble):
        predictor.outputs(x)  # the first call's allocations are not the model's cost
        timed = []
        for _ in range(3):
            began = time.perf_counter()
            predictor.outputs(x)
            timed.append(time.perf_counter() - began)
        seconds.append(min(timed))
    return seconds[1] / max(seconds[0], 1e-9)


def ensemble_sentence(record: Mapping[str, Any]) -> str:
    """The ensemble in one line: its gain on validation ± the members' sd, on test (read only), the decision and the
    prediction cost ("Ensemble of 5 (...): +0.8 ± 0.3 points on validation, ..., at 5.0x the prediction time")."""
    gain = f"{100 * record['val_gain']:+.1f} ± {100 * (record['val_gain_sd'] or 0.0):.1f} points on validation"
    test = f", {100 * record['test_gain']:+.1f} on test (read only)" if record.get("test_gain") is not None else ""
    head = (f"Ensemble of {record['models']} (trial {record['trial']}'s confirmation models, probabilities "
            f"averaged): val_acc {record['val_acc']:.3f}, {gain}{test}")
    cost = f"{record['predict_time_ratio']:.1f}x the prediction time"
    if record["beats"]:
        return f"{head}; beyond noise: the ensemble is the study's model, at {cost}."
    return f"{head}; within noise: the single model stays the study's model (the ensemble would take {cost})."


def keep_single(study: optuna.Study) -> None:
    """Where an earlier confirmation made an ensemble the study's model and this one did not: the single best model
    is the study's model again."""
    from regsearch.tracking._store import MODEL_ATTR

    model = study.user_attrs.get(MODEL_ATTR) or {}
    if model.get("ensemble") and model.get("single"):
        study.set_user_attr(MODEL_ATTR, model["single"])
        logger.info("the study's model is the single best model again: %s", model["single"]["uri"])


def log_ensemble(study: optuna.Study, exp: Experiment, tracking_uri: str, record: Mapping[str, Any],
                 predictor: Predictor) -> None:
    """On the study's run: the ensemble's measures (`ensemble_*` metrics) and its sentence (tag
    `regsearch.ensemble`); where it beats one model, the ensemble itself as the study's model (`ensemble_model`,
    the pyfunc of the best model, registered where the study asks). A tracking failure is one warning."""
    from mlflow.entities import Metric

    from regsearch._storage import mask_url
    from regsearch.tracking import error_gist, open_tracking
    from regsearch.tracking._batches import log_batches
    from regsearch.tracking._port import registration
    from regsearch.tracking._store import MODEL_ATTR

    where = f"MLflow ({mask_url(tracking_uri)})"
    try:
        tracking = open_tracking(tracking_uri, study.study_name, in_process=True)
    except Exception as exc:
        logger.warning("%s: the ensemble was not logged: %s", where, error_gist(exc))
        return
    try:
        if tracking.on_study_run(study) is None:
            logger.warning("%s: study %s has no parent run in this store; the ensemble is not logged", where,
                           study.study_name)
            return
        now = int(time.time() * 1000)
        metrics = [Metric(f"ensemble_{k}", float(record[k]), now, 0) for k in (
            "val_acc", "val_loss", "test_acc", "val_gain", "test_gain", "predict_time_ratio") if record[k] is not None]
        tracking.store.now_or_later("logging the ensemble's measures", log_batches, tracking.store.client,
                                    tracking.parent, metrics=metrics, tags={"regsearch.ensemble": record["sentence"]})
        if not record["beats"]:
            return
        single = study.user_attrs.get(MODEL_ATTR) or {}
        tracking.log_model(predictor, predictor.example(exp.data), registration(
            exp.spec.search.register_model, study.study_name, record["trial"], record["test_acc"],
            **{"regsearch.ensemble": str(record["models"])}), name=ENSEMBLE_MODEL,
            about={"ensemble": record["models"], "trial": record["trial"], "single": single.get("single", single)})
    finally:
        tracking.close()
    model = study.user_attrs.get(MODEL_ATTR) or {}
    if record["beats"] and model.get("ensemble"):
        logger.info("the study's model is the ensemble of %d: %s", record["models"], model["uri"])
