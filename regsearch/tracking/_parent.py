"""One parent run per study, agreed on by every process that shares the study, and the study's experiment."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from regsearch import _thirdparty
from regsearch._errors import StorageError
from regsearch._storage import mask_url, storage_identity
from regsearch.tracking._store import PARENT_RUN_ATTR, check_tracking_uri, error_gist, local_tracking_path

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Run

logger = logging.getLogger("regsearch")

PENDING_PARENT_TAG = "regsearch.pending_parent"
"""On a new study run (its value: the study's key) until the processes that may be making one agree on it."""


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment tag that makes MLflow 3 open an experiment on its runs, not on its GenAI overview."""


_SETTLE_S = 2.0
"""How long a process that finds no study run waits before choosing among those made meanwhile: much longer than
another process takes to search for one and make its own."""


def study_key(storage: str | None, study: optuna.Study) -> str:
    """What names one Optuna study for everyone who shares its storage, however they spell the storage's URL."""
    text = f"{storage_identity(storage)}\n{study.study_name}\n{_thirdparty.study_id(study)}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the experiment `name`, restored or created (by whichever worker is first), opening on its runs."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        for key, value in EXPERIMENT_KIND.items():
            if found.tags.get(key) != value:
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    try:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    except MlflowException:  # another worker created it a moment ago
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def stored_parent(client: MlflowClient, experiment: str, study: optuna.Study) -> Run | None:
    """The study's parent run as its user attributes name it, if it is in `experiment` and not deleted."""
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)  # read afresh from the storage
    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.experiment_id == experiment and run.info.lifecycle_stage == "active":
                return run
        except Exception:  # the run is gone (another tracking store, deleted): make a new one
            pass
    return None


def agree_on_parent(client: MlflowClient, experiment: str, study: optuna.Study, run_name: str, key: str,
                    log_params: Callable[[str], None]) -> str:
    """Make the study run, agreeing with the processes that may be making one at this moment.

    No store offers an atomic "create unless it exists" that leaves nothing behind (the Optuna storage's is a
    study of its own), so: a process that finds no pending run for `key` (tag `PENDING_PARENT_TAG`) makes one;
    after `_SETTLE_S` each sees every run made meanwhile and takes the same one, the earliest, unless one was
    recorded meanwhile. The chooser records it in the study and clears its tag (so that no other study with
    the same key ever takes it); a process whose run lost deletes it.
    """
    for _ in range(3):  # again only when the pending runs vanished without a choice (deleted by hand)
        mine = None
        if not _pending_parents(client, experiment, key):
            mine = client.create_run(experiment, run_name=run_name, tags={
                "regsearch.study": run_name, "regsearch.role": "study", PENDING_PARENT_TAG: key}).info.run_id
            log_params(mine)
        time.sleep(_SETTLE_S)
        pending = _pending_parents(client, experiment, key)
        # read after the search: a chooser records before it clears the tag
        run_id = _stored_id(client, experiment, study)
        if run_id is None and pending:
            run_id = min(pending, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
            study.set_user_attr(PARENT_RUN_ATTR, run_id)
            _settled(client, run_id)
        if mine is not None and mine != run_id:
            client.delete_run(mine)
        if run_id is not None:
            return run_id
    raise RuntimeError("the study runs made for this study keep disappearing")


def _pending_parents(client: MlflowClient, experiment: str, key: str) -> list[Run]:
    """The study runs made for the study `key` that no process has chosen yet."""
    return client.search_runs([experiment], filter_string=f"tags.`{PENDING_PARENT_TAG}` = '{key}'", max_results=100)


def _settled(client: MlflowClient, run_id: str) -> None:
    """Clear the chosen run's pending tag, unless a process that chose the same run cleared it first."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        client.delete_tag(run_id, PENDING_PARENT_TAG)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise


def _stored_id(client: MlflowClient, experiment: str, study: optuna.Study) -> str | None:
    run = stored_parent(client, experiment, study)
    return run.info.run_id if run is not None else None


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


def _run(client: MlflowClient, run_id: str) -> Run | None:
    """The run, or None when the store does not hold it (the study ran against another store)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.get_http_status_code() == 404:
            return None
        raise
