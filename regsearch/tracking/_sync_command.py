"""The commands that reach MLflow from a stored study: `regsearch sync`, and the report logged by `regsearch report`."""

from __future__ import annotations

import logging
import os
from typing import Any

import optuna

from regsearch._errors import StorageError, StudyError
from regsearch._opening import load_stored_study
from regsearch._storage import mask_url
from regsearch.tracking._client import Tracker
from regsearch.tracking._store import (
    PARENT_RUN_ATTR,
    check_tracking_uri,
    default_tracking_uri,
    error_gist,
    local_tracking_path,
)
from regsearch.tracking._sync import SyncReport, sync_runs

logger = logging.getLogger("regsearch")


def sync_study(study: str, *, storage: str | None = None, tracking_uri: str | None = None,
               study_name: str | None = None) -> tuple[str, SyncReport]:
    """`regsearch sync`: log a stored study's missing trial runs; returns (the study's name, the report)."""
    opt_study = load_stored_study(study, storage, study_name)
    name = opt_study.study_name
    uri = tracking_uri or default_tracking_uri()
    try:
        tracker = Tracker.open(uri, name)
    except Exception as exc:
        raise StorageError(f"--tracking-uri {mask_url(uri)}: cannot use the MLflow tracking store: "
                           f"{error_gist(exc)}") from None
    try:
        parent = tracker.find_parent(opt_study)
        if parent is None:
            if not opt_study.get_trials(deepcopy=False):
                return name, SyncReport()
            parent = tracker.parent_run(opt_study, name, {"study_file": opt_study.user_attrs.get(
                "regsearch.source", "")}, sync=False, storage=storage)
        report = sync_runs(opt_study, tracker, parent)
        # a study run left RUNNING by an outage at its end: ended, unless a trial is running somewhere now
        if (not opt_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                and tracker.client.get_run(parent).info.status == "RUNNING"):
            tracker.client.set_terminated(parent, status="FINISHED")
    except Exception as exc:
        raise StudyError(f"MLflow ({mask_url(uri)}): syncing study {name!r} stopped: {error_gist(exc)}; the runs "
                         f"logged so far stay, rerun `regsearch sync` to log the rest") from None
    finally:
        tracker.close()
    return name, report


def log_to_parent_run(study: optuna.Study, path: str | os.PathLike[str], tracking_uri: str) -> str | None:
    """Log the report file as an artifact of the study's MLflow parent run; its id, or None after one warning.

    A missing store, a store without the study's parent run, or one that does not answer is not an error: the
    report file is there anyway. A local SQLite store that does not exist is not created.
    """
    where = f"MLflow ({mask_url(tracking_uri)})"
    local = local_tracking_path(tracking_uri)
    if local is not None and not local[0].exists():
        logger.warning("%s: no tracking store there; the report is not logged to MLflow", where)
        return None
    try:
        check_tracking_uri(tracking_uri)
    except StorageError as exc:
        logger.warning("%s: cannot use the tracking store (%s); the report is not logged to MLflow", where, exc)
        return None
    # an unreachable server must cost seconds, not MLflow's default minutes of retries (as for a study)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        experiment = client.get_experiment_by_name(study.study_name)
        run = _run(client, run_id) if run_id and experiment is not None else None
        if run is None or run.info.experiment_id != experiment.experiment_id or run.info.lifecycle_stage != "active":
            logger.warning("%s: study %s has no parent run in this store; the report is not logged to MLflow", where,
                           study.study_name)
            return None
        client.log_artifact(run_id, str(path))
    except Exception as exc:
        logger.warning("%s: the report was not logged to MLflow: %s", where, error_gist(exc))
        return None
    return run_id


def _run(client: Any, run_id: str) -> Any:
    """The run, or None when the store does not hold it (the study ran against another store)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.get_http_status_code() == 404:
            return None
        raise
