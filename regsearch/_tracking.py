"""MLflow tracking: an experiment per study, one parent run shared by all workers, a child run per trial.

Per-epoch metrics are buffered and sent in batches from a background thread, so that logging never waits
on the tracking store inside the training loop. A tracking failure is a warning, never a crashed study.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from regsearch._storage import mask_url

logger = logging.getLogger("regsearch")

PARENT_RUN_ATTR = "mlflow_parent_run_id"
_MAX_PARAMS_PER_CALL = 100
_MAX_METRICS_PER_CALL = 1000


def default_tracking_uri() -> str:
    """MLflow's own default, made explicit: `mlflow.db` in the current folder (found by a plain `mlflow ui`)."""
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


class Tracker:
    """Logs a study's runs to one MLflow tracking store."""

    def __init__(self, tracking_uri: str, experiment: str, flush_interval: float = 2.0) -> None:
        # A dead tracking server must not stall training for minutes (MLflow's defaults: 7 retries, 120 s).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self._experiment(experiment)
        self._pending: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._warned: set[str] = set()
        self._interval = flush_interval
        self._thread = threading.Thread(target=self._loop, name="regsearch-mlflow", daemon=True)
        self._thread.start()

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another worker created it a moment ago
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _warn(self, what: str, exc: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning("MLflow (%s): %s failed, training goes on: %s", mask_url(self.uri), what,
                           mask_url(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__)

    # --- runs --------------------------------------------------------------------------------------------

    def parent_run(self, study: Any, run_name: str, params: Mapping[str, Any]) -> str:
        """The study's parent run, created once and remembered in the study's user attributes.

        Processes started at the same moment on several machines agree on one parent run: creating an Optuna
        study is atomic in every storage, so a marker study decides which process creates the run; the
        others wait for its id to appear.
        """
        run_id = self._existing_parent(study)
        if run_id:
            return run_id
        import optuna

        digest = hashlib.sha1(f"{self.uri}|{self.experiment_id}".encode()).hexdigest()[:10]
        marker = f"{study.study_name}.regsearch-parent-run.{digest}"
        try:
            optuna.create_study(study_name=marker, storage=study._storage)
        except optuna.exceptions.DuplicatedStudyError:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.2)
                run_id = self._existing_parent(study)
                if run_id:
                    return run_id
            logger.warning("MLflow: no parent run appeared for study %s within 60 s; creating one",
                           study.study_name)
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"regsearch.study": run_name, "regsearch.role": "study"})
        run_id = run.info.run_id
        self._log_now(run_id, params=params)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return run_id

    def _existing_parent(self, study: Any) -> str | None:
        study_id = study._study_id
        run_id = study._storage.get_study_user_attrs(study_id).get(PARENT_RUN_ATTR)
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    if run.info.status != "RUNNING":
                        self.client.update_run(run_id, status="RUNNING")
                    return run_id
            except Exception:  # the run is gone (another tracking store, deleted): make a new one
                pass
        return None

    def start_trial(self, parent_run_id: str, number: int, study_name: str) -> str | None:
        try:
            run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}", tags={
                "mlflow.parentRunId": parent_run_id, "trial_number": str(number), "regsearch.study": study_name,
                "regsearch.state": "RUNNING"})
            return run.info.run_id
        except Exception as exc:  # tracking must not fail the trial
            self._warn("creating a trial run", exc)
            return None

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        if run_id is not None:
            self._log_now(run_id, params=params)

    def log_epoch(self, run_id: str | None, step: int, metrics: Mapping[str, float]) -> None:
        """Queue one epoch's metrics; the background thread sends them in batches."""
        if run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self._pending.extend((run_id, Metric(k, float(v), now, step)) for k, v in metrics.items())
        if len(self._pending) >= _MAX_METRICS_PER_CALL:
            self._wake.set()

    def end_trial(self, run_id: str | None, status: str, tags: Mapping[str, str]) -> None:
        if run_id is None:
            return
        self.flush()
        self._log_now(run_id, tags=tags)
        try:
            self.client.set_terminated(run_id, status=status)
        except Exception as exc:
            self._warn("ending a trial run", exc)

    def log_summary(self, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_now(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], tags=tags)

    def end_parent(self, run_id: str, status: str = "FINISHED") -> None:
        try:
            self.client.set_terminated(run_id, status=status)
        except Exception as exc:
            self._warn("ending the study run", exc)

    def log_model(self, run_id: str, model: Any, example: Any) -> None:
        """The best trial's model, with an input example (and so a signature), on the study's parent run."""
        import mlflow
        import torch

        previous = mlflow.get_tracking_uri()
        try:
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=run_id, nested=True):
                mlflow.pytorch.log_model(model.cpu().eval(), name="best_model",
                                         input_example=example.cpu().numpy(),
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        except Exception as exc:
            self._warn("logging the best model", exc)
        finally:
            mlflow.set_tracking_uri(previous)

    # --- batching ----------------------------------------------------------------------------------------

    def _log_now(self, run_id: str, params: Mapping[str, Any] | None = None, metrics: list | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Param, RunTag

        try:
            items = [Param(k, mask_url(str(v))[:6000]) for k, v in (params or {}).items()]
            for i in range(0, len(items), _MAX_PARAMS_PER_CALL):
                self.client.log_batch(run_id, params=items[i:i + _MAX_PARAMS_PER_CALL])
            if metrics or tags:
                self.client.log_batch(run_id, metrics=metrics or [],
                                      tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
        except Exception as exc:
            self._warn("logging", exc)

    def flush(self) -> None:
        """Send every queued metric now."""
        with self._lock:
            pending, self._pending = self._pending, []
        by_run: dict[str, list] = {}
        for run_id, metric in pending:
            by_run.setdefault(run_id, []).append(metric)
        for run_id, metrics in by_run.items():
            for i in range(0, len(metrics), _MAX_METRICS_PER_CALL):
                try:
                    self.client.log_batch(run_id, metrics=metrics[i:i + _MAX_METRICS_PER_CALL])
                except Exception as exc:
                    self._warn("logging metrics", exc)

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()
