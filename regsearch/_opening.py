"""Opening a study in its Optuna storage: created once, its sampler and pruner, its checks, its first trials."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from regsearch._errors import ConfigError, StudyError, unknown_name
from regsearch._records import (
    BASELINE_ATTR,
    FAIL,
    FAIL_REASON_ATTR,
    INTERRUPTED,
    MAX_GAP_ATTR,
    OBJECTIVE_ATTR,
    is_baseline,
)
from regsearch._search_space import baseline_params, encoded, most_epochs
from regsearch._spec import StudySpec
from regsearch._storage import describe_storage, open_storage

_MAX, _MIN = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
DIRECTIONS = {"val_acc": [_MAX], "pareto": [_MAX, _MIN]}


def sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    s = spec.search.sampler
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Pinned, not left to version defaults: multivariate TPE with groups handles the conditional spaces of
    # on/off switches; the constant liar keeps parallel workers from sampling the same point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group`, stable in practice
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials, multivariate=True,
                                          group=True, constant_liar=True)


def pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.search.pruner
    if spec.search.objective == "pareto":
        return optuna.pruners.NopPruner()  # Optuna cannot prune multi-objective studies
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=most_epochs(spec),
                                              reduction_factor=p.reduction_factor)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource,
                                                      reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(spec: StudySpec, name: str, storage: str | None, *, create: bool, salt: int = 0
               ) -> tuple[optuna.Study, bool]:
    """(the Optuna study, whether this process made it just now): created once, by the first process."""
    optuna_storage = open_storage(storage, heartbeat_interval=spec.search.heartbeat_interval,
                                  grace_period=spec.search.grace_period)
    search = spec.search
    try:
        if create:
            created = optuna.create_study(storage=optuna_storage, study_name=name, load_if_exists=True,
                                          directions=DIRECTIONS[search.objective])
        else:
            created = optuna.load_study(study_name=name, storage=optuna_storage)
    except Exception as exc:
        raise StudyError(f"cannot open study {name!r} in {describe_storage(storage)}: {exc}") from exc
    check_objective(created, search.objective, search.max_gap, f"study {name!r} in {describe_storage(storage)}")
    # a different sampler seed per worker and per resume: workers must not replay each other's draws
    sampler_seed = spec.seed + len(created.trials) * 7_919 + salt * 104_729
    study = optuna.load_study(study_name=name, storage=optuna_storage,
                              sampler=sampler(spec, sampler_seed % (2**31 - 1)), pruner=pruner(spec))
    if create:
        study.set_user_attr("regsearch.source", spec.source)
        study.set_user_attr(OBJECTIVE_ATTR, search.objective)
        study.set_user_attr(MAX_GAP_ATTR, search.max_gap)
    return study, create and not created.trials


def queue_first_trials(study: optuna.Study, spec: StudySpec, new: bool,
                       model_space: Mapping[str, Any] | None = None) -> None:
    """The unregularized baseline (once) and, in a new study, the study file's `first_trial` (the recipe).

    `model_space`: what a model factory taking the trial asks (`Experiment.model_space`), fixed in the baseline.
    """
    if spec.search.baseline and _baseline_missing(study):
        study.enqueue_trial(baseline_params(spec, model_space), user_attrs={BASELINE_ATTR: True})
    if new and spec.search.first_trial:
        study.enqueue_trial(encoded(spec.search.first_trial), skip_if_exists=True)


def _baseline_missing(study: optuna.Study) -> bool:
    """Whether the study still needs its baseline trial: none is queued, running or finished, and none failed
    on its own (an interrupted or killed one is queued again; a diverging one is not run over and over)."""
    baselines = [t for t in study.get_trials(deepcopy=False) if is_baseline(t)]
    if any(t.state != FAIL for t in baselines):
        return False
    return not any(t.user_attrs.get(FAIL_REASON_ATTR) not in (None, INTERRUPTED) for t in baselines)


def check_objective(study: optuna.Study, objective: str, max_gap: float | None, where: str) -> None:
    """Refuse to resume a study with another objective or gap constraint: its trials would not compare."""
    directions = list(study.directions)
    if directions not in DIRECTIONS.values():
        shown = ", ".join(d.name.lower() for d in directions)
        raise ConfigError(f"{where} is not a regsearch study (its directions: {shown})")
    stored = study.user_attrs.get(OBJECTIVE_ATTR, "pareto" if len(directions) > 1 else "val_acc")
    if directions != DIRECTIONS[objective] or stored != objective:
        raise ConfigError(f"{where} was made with objective {stored}; it cannot go on with objective {objective} "
                          f"(use --objective {stored}, or another --study-name)")
    if not study.trials:
        return  # brand new, or a start that was refused before any trial: this process sets its settings
    stored_gap = study.user_attrs.get(MAX_GAP_ATTR)
    if stored_gap != max_gap:
        def shown(gap: float | None) -> str:
            return "no --max-gap" if gap is None else f"--max-gap {gap:g}"
        raise ConfigError(f"{where} was made with {shown(stored_gap)}; it cannot go on with {shown(max_gap)} "
                          f"(use the same, or another --study-name)")


def fixed_settings(spec: StudySpec) -> dict[str, Any]:
    """The study-wide settings logged on the parent run."""
    t = spec.training
    table = {f"data.{k}": v for k in ("path", "target", "test_path") if (v := getattr(spec.data, k)) is not None}
    return {"study_file": spec.source, "data": spec.data.name, **table, "model": spec.model.name,
            **{f"model.{k}": v for k, v in spec.model.options.items()},
            **{f"model.{k}": v for k in spec.model.own_keys if (v := getattr(spec.model, k))},
            "epochs": t.epochs, **({"steps": t.steps} if t.steps is not None else {}),
            "batch_size": t.batch_size, "optimizer": t.optimizer, "lr": str(t.lr),
            "schedule": t.schedule, "label_smoothing": t.label_smoothing, "precision": t.precision, "seed": spec.seed,
            "objective": spec.search.objective,
            **({"max_gap": spec.search.max_gap} if spec.search.max_gap is not None else {}),
            "regularizers": ", ".join(f"{r.name}:{r.enabled}" for r in spec.regularizers) or "none",
            # a searched key shows its range or choices, not the baseline's value the spec holds for it
            **{key.removeprefix("training."): str(space) for key, space in spec.searched.items()}}


def load_stored_study(study: str, storage: str | None = None, study_name: str | None = None) -> optuna.Study:
    """A stored study by its study file/name (or explicit study name), for `show`, `report` and `sync`."""
    name = study_name or (Path(study).stem if study.endswith((".yaml", ".yml")) else study)
    optuna_storage = open_storage(storage, create=False)  # reading creates no empty storage
    names = [s.study_name for s in optuna.get_all_study_summaries(optuna_storage, include_best_trial=False)]
    if name not in names:
        raise ConfigError(unknown_name(f"study in {describe_storage(storage)}:", name, names))
    return optuna.load_study(study_name=name, storage=optuna_storage)
