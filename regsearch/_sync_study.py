"""`regsearch sync`: log a stored study's trials that MLflow missed, from the Optuna storage."""

from __future__ import annotations

import optuna

from regsearch._errors import StorageError, StudyError
from regsearch._opening import load_stored_study
from regsearch._storage import mask_url
from regsearch.tracking import SyncReport, default_tracking_uri, error_gist, open_tracking, sync_runs


def sync_study(study: str, *, storage: str | None = None, tracking_uri: str | None = None,
               study_name: str | None = None) -> tuple[str, SyncReport]:
    """Log a stored study's missing trial runs; returns (the study's name, the report)."""
    opt_study = load_stored_study(study, storage, study_name)
    name = opt_study.study_name
    uri = tracking_uri or default_tracking_uri()
    try:
        tracking = open_tracking(uri, name, in_process=True)
    except Exception as exc:
        raise StorageError(f"--tracking-uri {mask_url(uri)}: cannot use the MLflow tracking store: "
                           f"{error_gist(exc)}") from None
    store = tracking.store
    try:
        parent = store.find_parent(opt_study)
        if parent is None and not opt_study.get_trials(deepcopy=False):
            return name, SyncReport()
        tracking.parent_run(opt_study, name, {"study_file": opt_study.user_attrs.get("regsearch.source", "")},
                            storage=storage, ends_study=False, sync=False, reopen=False)
        parent = tracking.parent
        assert parent is not None  # parent_run raises when it cannot make one
        report = sync_runs(opt_study, store, parent)
        # a study run left RUNNING by an outage at its end: ended, unless a trial is running somewhere now
        if (not opt_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                and store.client.get_run(parent).info.status == "RUNNING"):
            store.client.set_terminated(parent, status="FINISHED")
    except Exception as exc:
        raise StudyError(f"MLflow ({mask_url(uri)}): syncing study {name!r} stopped: {error_gist(exc)}; the runs "
                         f"logged so far stay, rerun `regsearch sync` to log the rest") from None
    finally:
        tracking.close()
    return name, report
