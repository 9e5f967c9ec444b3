"""A process's hold on a study: its Optuna study, its tracking process and the study's parent run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from regsearch._errors import ConfigError
from regsearch._opening import fixed_settings, open_study, queue_first_trials
from regsearch._spec import StudySpec
from regsearch._storage import mask_url
from regsearch.tracking import Tracking, default_tracking_uri, open_tracking


@dataclass(frozen=True)
class Stores:
    """Where a study lives and is logged: its Optuna storage (None: the journal file here) and MLflow."""

    storage: str | None = None
    tracking: bool = True
    tracking_uri: str | None = None


def start_tracking(stores: Stores, name: str) -> Tracking | None:
    """The tracking process (it imports MLflow and opens the store while this process prepares), or None."""
    if not stores.tracking:
        return None
    uri = stores.tracking_uri or default_tracking_uri()
    try:
        return open_tracking(uri, name)
    except Exception as exc:
        raise tracking_error(uri, exc) from None


def tracking_error(uri: str, exc: BaseException) -> ConfigError:
    return ConfigError(f"--tracking-uri {mask_url(uri)}: cannot use the MLflow tracking store: "
                       f"{mask_url(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__}")


def attach(spec: StudySpec, name: str, stores: Stores, *, create: bool, salt: int = 0,
           tracker: Tracking | None = None, model_space: Mapping[str, Any] | None = None,
           remember: Callable[[optuna.Study], None] | None = None) -> tuple[optuna.Study, Tracking | None]:
    """The Optuna study (created once, by the first process) and, when tracked, its MLflow parent run opened.

    `model_space`: what the model factory asks of a trial, fixed in the baseline trial (see `queue_first_trials`);
    `remember`: called with the study once it is open, before anything is logged or queued (see `Question.remember`).
    """
    study, new = open_study(spec, name, stores.storage, create=create, salt=salt)
    if remember is not None:
        remember(study)
    if stores.tracking:
        tracker = tracker or start_tracking(stores, name)
        try:
            tracker.parent_run(study, name, fixed_settings(spec), storage=stores.storage, ends_study=create)
        except Exception as exc:
            tracker.close(wait=False)
            raise tracking_error(tracker.uri, exc) from None
    if create:  # queued only once the tracking store is known to work: a refused start leaves no trial behind
        queue_first_trials(study, spec, new, model_space)
    return study, tracker
