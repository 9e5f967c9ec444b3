"""Confirming a study's winner: its finalists, the recipe and the baseline retrained with fresh seeds.

A single run's ranking on a small validation split is noise (on digits one image is 0.37 points). The finalists
(the top K complete configurations by the one ranking, the study file's `first_trial` recipe and the
unregularized baseline) are each trained again with the same N fresh seeds; the winner is the highest MEAN
validation accuracy (ties: the lower mean validation loss). Test accuracy is measured and reported, never
used to choose. Where one validation split holds too few rows to choose with, k-fold cross-validation of the
finalists validates each configuration on every row of the pooled training and validation splits.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import optuna
import torch
from torch import nn

from regsearch._ablate import ABLATION_ATTR, ablate, refuse_ablation
from regsearch._ensemble import NO_ENSEMBLE_WITH_FOLDS, form_ensemble, keep_single, log_ensemble
from regsearch._errors import ConfigError, TrialDiverged
from regsearch._records import (
    COMPLETE,
    CONFIRM_ATTR,
    configuration,
    confirm_method,
    confirm_sentence,
    is_baseline,
    leaderboard,
    trial_val_acc,
)
from regsearch._search_space import encoded
from regsearch._spec import StudySpec, seeds_problem
from regsearch._trainer import fit
from regsearch._trial import Experiment, build_trial, stored_autocast, test_score, training_for, trial_seed
from regsearch.data._tensors import TensorData, cv_folds, fold_split

logger = logging.getLogger("regsearch")

_METRICS = ("val_acc", "test_acc", "gap_acc", "val_loss")


def confirm(study: str | StudySpec, *, top: int = 3, seeds: int | None = None, folds: int | None = None,
            storage: str | None = None,
            study_name: str | None = None, tracking: bool = True, tracking_uri: str | None = None,
            data: TensorData | None = None, model: Callable[..., nn.Module] | None = None,
            data_dir: str | None = None, device: str = "auto", overrides: Iterable[tuple[str, Any]] = (),
            plugins: Iterable[str] = (), ablate: bool = False) -> list[dict[str, Any]]:
    """Retrain a stored study's top `top` configurations, its recipe and its baseline with `seeds` fresh seeds
    (default 3), or in `folds`-fold cross-validation repeated `seeds` times (default once); returns one row per
    configuration, the winner (highest mean val_acc) first.

    A study is retrained as it stored itself: `study` may be its name alone, and a file, `overrides` or `plugins`
    that would change it are refused. `data` and `model` given in Python, and studies stored without that record,
    must be given as `optimize` ran them. The rows are also stored in the study's user attr `confirm` (shown by
    `regsearch show`) and, when tracked, logged to MLflow. With seeds, the winner's models are averaged
    (`regsearch._ensemble`): where they beat one model beyond noise, the ensemble is logged as the study's model.
    `ablate` then ablates the winner (`ablate_confirmed`).
    """
    from regsearch._experiment import prepare
    from regsearch._opening import load_stored_study
    from regsearch._question import ask, python_inputs
    from regsearch._study_record import refuse_foreign_params, refuse_other_data

    seeds = check_counts(top, seeds, folds)
    question = ask(study, study_name=study_name, storage=storage, overrides=overrides, plugins=tuple(plugins),
                   data_dir=data_dir)
    question.check_inputs(python_inputs(data, model))
    stored = load_stored_study(question.name, storage)
    if question.stored is None:
        refuse_foreign_params(stored, question.spec)
    if ablate:
        refuse_ablation(stored, question.spec.search.baseline)
    exp = prepare(question.spec, data=data, model=model, data_dir=question.data_dir, device=device,
                  plugins=question.plugins)
    if question.stored is not None:
        refuse_other_data(question.name, question.stored, exp.data)
    if tracking:
        from regsearch.tracking import default_tracking_uri

        tracking_uri = tracking_uri or default_tracking_uri()
    rows = confirm_study(stored, exp, top, seeds, tracking_uri if tracking else None, folds)
    if ablate:
        ablate_confirmed(stored, exp, tracking_uri if tracking else None)
    return rows


def check_counts(top: int, seeds: int | None, folds: int | None = None) -> int:
    """The number of seeds (3 alone, 1 with folds: the folds give the spread), after checking the counts."""
    if top < 1:
        raise ConfigError(f"top must be at least 1; got {top}")
    if folds is not None and folds < 2:
        raise ConfigError(f"folds must be at least 2; got {folds}")
    problem = seeds_problem(seeds, folds)
    if problem:
        raise ConfigError(f"seeds {problem}")
    return seeds if seeds is not None else 3 if folds is None else 1


def confirm_at_end(study: optuna.Study, exp: Experiment, stores: Any) -> None:
    """`optimize`'s last step when the study file asks for it (`search.confirm`; off by default). A study
    resumed with nothing new to run keeps the confirmation it has of the same finalists and seeds."""
    settings = exp.spec.search.confirm
    if settings is None or not study.get_trials(deepcopy=False, states=(COMPLETE,)):
        return
    done = study.user_attrs.get(CONFIRM_ATTR) or {}
    numbers = [t.number for t, _ in finalists(study, exp.spec, settings.top)]
    seeds = check_counts(settings.top, settings.seeds, settings.folds)
    uri = None
    if stores.tracking:
        from regsearch.tracking import default_tracking_uri

        uri = stores.tracking_uri or default_tracking_uri()
    if not (sorted(r["trial"] for r in done.get("rows", [])) == sorted(numbers) and done.get("folds") == settings.folds
            and done.get("seeds") == confirm_seeds(exp.spec.seed, seeds * (settings.folds or 1), numbers)):
        confirm_study(study, exp, settings.top, seeds, uri, settings.folds)
    if settings.ablate:
        done, ablated = study.user_attrs[CONFIRM_ATTR], study.user_attrs.get(ABLATION_ATTR) or {}
        winner = next(r for r in done["rows"] if r["winner"])
        if winner["role"] == "baseline":  # the study's answer is "no regularizer": said, not an error at its end
            logger.warning("search.confirm.ablate: the confirmed winner is the unregularized baseline (trial %d); "
                           "there is no regularizer to ablate", winner["trial"])
            return
        winner = winner["trial"]
        if (ablated.get("seeds"), ablated.get("folds"), ablated.get("winner")) != (done["seeds"], done.get("folds"),
                                                                                     winner):
            try:
                ablate_confirmed(study, exp, uri)
            except ConfigError as exc:  # a winner with every regularizer switched off: nothing to ablate, said
                logger.warning("search.confirm.ablate: %s", exc)


def confirm_study(study: optuna.Study, exp: Experiment, top: int, seeds: int, tracking_uri: str | None,
                  folds: int | None = None) -> list[dict[str, Any]]:
    """Confirm an open study's finalists in a prepared experiment; stores and (with a URI) logs the result. With
    seeds, the winner's models (only the best row's are held while the others train) form the ensemble."""
    seeds = check_counts(top, seeds, folds)
    chosen = finalists(study, exp.spec, top)
    if not chosen:
        raise ConfigError(f"study {study.study_name!r} has no complete trial to confirm")
    fresh = confirm_seeds(exp.spec.seed, seeds * (folds or 1), [t.number for t, _ in chosen])
    plan = run_plan(exp, fresh, folds)
    logger.info("confirming %d configurations of study %s: %s each", len(chosen), study.study_name,
                confirm_method(len(fresh), folds))
    rows, kept = [], None  # kept: the models of the best row so far (seeds only), the winner's in the end
    for trial, role in chosen:
        models: list[nn.Module] | None = [] if folds is None else None
        rows.append(_row(exp, trial, role, fresh, plan, keep=models))
        if models is not None and (kept is None or _rank(rows[-1]) < _rank(kept[0])):
            kept = (rows[-1], trial, models)
    rows.sort(key=_rank)
    for i, r in enumerate(rows):
        r["winner"] = i == 0
    sentence = confirm_sentence(rows, len(fresh), validation_rows(exp, plan), folds)
    whole = kept is not None and not kept[0]["diverged"] and len(kept[2]) >= 2  # one model per seed, all trained
    ensemble = form_ensemble(exp, kept[1], kept[0], kept[2]) if whole else None
    if folds is not None:
        logger.info(NO_ENSEMBLE_WITH_FOLDS)
    study.set_user_attr(CONFIRM_ATTR, {"seeds": fresh, "folds": folds, "spread": "sd", "rows": rows,
                                       "sentence": sentence, "ensemble": ensemble and ensemble[0]})
    if ensemble is None or not ensemble[0]["beats"]:
        keep_single(study)
    if tracking_uri is not None:
        log_confirmation(study, tracking_uri, rows, fresh, sentence, folds)
        if ensemble is not None:
            log_ensemble(study, exp, tracking_uri, *ensemble)
    return rows


def _rank(row: Mapping[str, Any]) -> tuple:
    """The confirmation's ranking (smaller is better): a configuration none of whose runs diverged first, then the
    higher mean val_acc, then the lower mean val_loss."""
    acc, loss = row["val_acc_mean"], row["val_loss_mean"]
    return (bool(row.get("diverged")), math.inf if acc is None else -acc, math.inf if loss is None else loss,
            row["trial"])


def run_plan(exp: Experiment, seeds: Sequence[int], folds: int | None
             ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per run of a confirmation (one per seed): the fold's (train, val) rows of the pooled splits, or None (the
    study's own split); with folds, the seeds come `folds` to a cut, each cut drawn with its first seed."""
    if folds is None:
        return [None] * len(seeds)
    return [rows for repeat in range(len(seeds) // folds) for rows in cv_folds(exp.data, folds, seeds[repeat * folds])]


def validation_rows(exp: Experiment, plan: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> int:
    """The validation rows of one run (the smallest fold's): what one example is worth in `beyond_noise`."""
    return len(exp.data.y_val) if plan[0] is None else min(len(val) for _, val in plan)


def ablate_confirmed(study: optuna.Study, exp: Experiment, tracking_uri: str | None) -> dict[str, Any]:
    """Ablate the study's stored confirmation with its seeds and folds (`regsearch._ablate`); stores it (user attr
    `ablation`) and, with a URI, logs it."""
    done = study.user_attrs[CONFIRM_ATTR]
    plan = run_plan(exp, done["seeds"], done.get("folds"))
    ablation = ablate(study, exp.spec, lambda trial, **build: trained_runs(exp, trial, done["seeds"], plan, **build),
                      validation_rows(exp, plan))
    study.set_user_attr(ABLATION_ATTR, ablation)
    if tracking_uri is not None:
        log_ablation(study, tracking_uri, ablation)
    return ablation


def finalists(study: optuna.Study, spec: StudySpec, top: int) -> list[tuple[optuna.trial.FrozenTrial, str]]:
    """(trial, role) of the configurations to confirm: the top `top` distinct complete ones by the one ranking,
    then the recipe and the baseline where the study has them; role is searched, recipe or baseline."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))}
    ranked = [trials[r["number"]] for r in leaderboard(study, top=len(trials)) if r["number"] in trials]
    recipe = find_recipe(study, spec)
    baseline = next((t for t in ranked if is_baseline(t)), None)

    def role(t: optuna.trial.FrozenTrial) -> str:
        return "baseline" if is_baseline(t) else "recipe" if recipe is not None and t.number == recipe.number \
            else "searched"

    chosen: list[optuna.trial.FrozenTrial] = []
    seen: list[tuple[dict[str, Any], bool]] = []
    for t in ranked:
        if len(chosen) == top:
            break
        if (t.params, is_baseline(t)) not in seen:  # a configuration sampled twice is confirmed once
            chosen.append(t)
            seen.append((t.params, is_baseline(t)))
    for extra in (recipe, baseline):
        if extra is not None and all(extra.number != t.number for t in chosen):
            chosen.append(extra)
    return [(t, role(t)) for t in chosen]


def find_recipe(study: optuna.Study, spec: StudySpec) -> optuna.trial.FrozenTrial | None:
    """The enqueued `first_trial`: the first complete non-baseline trial holding the recipe's parameters (the
    others it holds were sampled)."""
    if not spec.search.first_trial:
        return None
    recipe = encoded(spec.search.first_trial)
    for t in study.get_trials(deepcopy=False, states=(COMPLETE,)):
        if not is_baseline(t) and all(k in t.params and t.params[k] == v for k, v in recipe.items()):
            return t
    return None


def confirm_seeds(study_seed: int, n: int, avoid: Sequence[int] = ()) -> list[int]:
    """N seeds shared by every finalist (a paired comparison: the same initial draws for all), none of them a
    trial's own seed (`avoid`: the finalists' trial numbers)."""
    own = {trial_seed(study_seed, number) for number in avoid}
    seeds: list[int] = []
    k = 1
    while len(seeds) < n:
        seed = (study_seed * 1_000_003 + k * 104_729 + 31) % (2**31 - 1)
        if seed not in own:
            seeds.append(seed)
        k += 1
    return seeds


def _row(exp: Experiment, trial: optuna.trial.FrozenTrial, role: str, seeds: Sequence[int],
         plan: Sequence[tuple[torch.Tensor, torch.Tensor] | None], keep: list[nn.Module] | None = None
         ) -> dict[str, Any]:
    """One configuration trained once per (seed, split): per-run metrics and their mean and (sample) sd; the
    trained models are appended to `keep` where given."""
    return {"trial": trial.number, "role": role, "config": configuration(exp.spec, trial),
            "params": dict(trial.params), "single_run_val_acc": trial_val_acc(trial),
            **trained_runs(exp, trial, seeds, plan, **({} if keep is None else {"keep": keep}))}


def trained_runs(exp: Experiment, trial: optuna.trial.FrozenTrial, seeds: Sequence[int],
                 plan: Sequence[tuple[torch.Tensor, torch.Tensor] | None], **build: Any) -> dict[str, Any]:
    """A stored configuration (changed by `build`: `retrain_with_seed`'s `on` and `params`; its `keep` keeps the
    models) trained once per (seed, split): each metric's per-run values, their mean and (sample) sd."""
    runs = [retrain_with_seed(exp if rows is None else replace(exp, data=fold_split(exp.data, *rows)), trial, seed,
                              **build) for seed, rows in zip(seeds, plan, strict=True)]  # one fold's copy at a time
    row: dict[str, Any] = {"diverged": sum(bool(r.get("diverged")) for r in runs)}
    for key in _METRICS:
        values = [r[key] for r in runs]
        row[key] = values
        known = [v for v in values if v is not None]
        row[f"{key}_mean"] = statistics.fmean(known) if known else None
        row[f"{key}_sd"] = statistics.stdev(known) if len(known) > 1 else None
    return row


def retrain_with_seed(exp: Experiment, trial: optuna.trial.FrozenTrial, seed: int, *,
                      on: Collection[str] | None = None, params: Mapping[str, Any] | None = None,
                      keep: list[nn.Module] | None = None) -> dict[str, float | None]:
    """A stored trial's configuration trained with another seed, in its precision: val, gap and test metrics.
    `on` and `params` (an ablation) switch on those regularizers, with those parameters, instead of the trial's;
    the trained model is appended to `keep` where given (the confirmation's ensemble). A run that diverges is
    one warning and metrics of None, with `diverged` set: what that configuration does is a result too."""
    fixed = optuna.trial.FixedTrial(dict(trial.params if params is None else params), number=trial.number)
    model, applied, lr = build_trial(exp, fixed, seed, baseline=is_baseline(trial), on=on)
    autocast = stored_autocast(exp, trial)
    try:
        metrics = fit(model, exp.data, applied, training_for(exp, trial), lr=lr, device=exp.device, seed=seed,
                      autocast=autocast)
    except TrialDiverged as exc:
        what = f"trial {trial.number}" if on is None else f"trial {trial.number} with {' + '.join(on) or 'nothing'}"
        logger.warning("%s diverged with seed %d (%s); counted as a diverged run", what, seed, exc)
        return {"val_acc": None, "gap_acc": None, "val_loss": None, "test_acc": None, "diverged": True}
    test_acc = test_score(exp, model, autocast)[1] if exp.data.y_test is not None else None
    if keep is not None:
        keep.append(model)
    return {"val_acc": metrics["val_acc"], "gap_acc": metrics["gap_acc"], "val_loss": metrics["val_loss"],
            "test_acc": test_acc}


def log_confirmation(study: optuna.Study, tracking_uri: str, rows: Sequence[Mapping[str, Any]],
                     seeds: Sequence[int], sentence: str, folds: int | None = None,
                     parent_tag: str = "regsearch.confirm") -> None:
    """One MLflow run per configuration under the study's parent run (per-run metrics as steps, then the means);
    a tracking failure is one warning, never a lost confirmation (it is in the Optuna storage already)."""
    from regsearch._storage import mask_url
    from regsearch.tracking import error_gist, open_tracking
    from regsearch.tracking._batches import log_batches

    where = f"MLflow ({mask_url(tracking_uri)})"
    try:
        tracker = open_tracking(tracking_uri, study.study_name, in_process=True).store
    except Exception as exc:
        logger.warning("%s: the confirmation was not logged: %s", where, error_gist(exc))
        return
    try:
        parent = tracker.find_parent(study)
        if parent is None:
            logger.warning("%s: study %s has no parent run in this store; the confirmation is not logged", where,
                           study.study_name)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for r in rows:
            run = tracker.client.create_run(tracker.experiment_id, run_name=r.get(
                "run_name", f"confirm-trial-{r['trial']}"), tags={
                "mlflow.parentRunId": parent, "regsearch.role": "confirm", "regsearch.study": study.study_name,
                "regsearch.source_trial": str(r["trial"]), "regsearch.confirm_role": r["role"],
                "regsearch.winner": str(r["winner"]).lower(), **r.get("tags", {})})
            metrics = [Metric(k, float(v), now, step) for k in _METRICS for step, v in enumerate(r[k])
                       if v is not None]
            metrics += [Metric(f"{k}_{stat}", float(r[f"{k}_{stat}"]), now, 0) for k in _METRICS
                        for stat in ("mean", "sd") if r[f"{k}_{stat}"] is not None]
            metrics += [Metric(k, float(v), now, 0) for k, v in r.get("extra_metrics", {}).items() if v is not None]
            params = {**r["params"], "seeds": list(seeds), "folds": folds or "none"}
            log_batches(tracker.client, run.info.run_id, params=params, metrics=metrics)
            tracker.client.set_terminated(run.info.run_id, status="FINISHED")
        tracker.client.set_tag(parent, parent_tag, sentence)
    except Exception as exc:
        logger.warning("%s: the confirmation was not (fully) logged: %s", where, error_gist(exc))
    finally:
        tracker.close()


def log_ablation(study: optuna.Study, tracking_uri: str, ablation: Mapping[str, Any]) -> None:
    """An ablation's configurations as runs under the study's parent run (`log_confirmation`'s), each tagged with
    the regularizer it removed from the winner or added to the baseline (`regsearch.removed`, `regsearch.added`),
    with its paired effects as metrics; the sentence is the parent's tag `regsearch.ablate`."""
    runs = [{**r, "role": "ablation", "winner": False, "run_name": f"ablate-{r['direction']}-{r['regularizer']}",
             "tags": {"regsearch.role": "ablate", f"regsearch.{r['direction']}": r["regularizer"]},
             "extra_metrics": {f"{k}_effect_{stat}": r[f"{k}_effect_{stat}"] for k in ("val_acc", "test_acc", "gap_acc")
                               for stat in ("mean", "sd")}} for r in ablation["rows"]]
    log_confirmation(study, tracking_uri, runs, ablation["seeds"], ablation["sentence"], ablation["folds"],
                     parent_tag="regsearch.ablate")
