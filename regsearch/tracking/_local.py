"""`Tracking` in this process: trial numbers to run ids on a `Tracker`, and what goes on the study run."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from regsearch._records import RUN_ID_ATTR, is_baseline
from regsearch.tracking._batches import log_batches
from regsearch.tracking._client import Tracker
from regsearch.tracking._store import MODEL_ATTR, error_gist
from regsearch.tracking._warmup import WarmUp, model_save_options, no_gc

if TYPE_CHECKING:
    import optuna

    from regsearch.tracking._port import Example, Registration
    from regsearch.tracking._predictor import Predictor

logger = logging.getLogger("regsearch")


class LocalTracking:
    """The study's runs logged from this process (see `Tracking`); the tracking process runs one too.

    `store` is the `Tracker`: its calls wait out an outage of the store, and what goes on the study run (summary,
    best model, report, end) is sent once the store is back. `warm`: while the study trains, rehearse the end of the
    study (saving a model, drawing a report) in a thread (the tracking process does; in the study's own process
    the thread would take the GIL from the training loop).
    """

    def __init__(self, store: Tracker, *, warm: bool = False) -> None:
        self.store = store
        self.uri = store.uri
        self.runs: dict[int, str | None] = {}  # the trials started and not yet ended
        store.live = self.runs
        self.parent: str | None = None
        self.study: optuna.Study | None = None
        self._warm = warm
        self.warm_up: WarmUp | None = None

    @classmethod
    def open(cls, uri: str, experiment: str, *, warm: bool = False) -> LocalTracking:
        """On the store at `uri` (created or migrated once), the experiment `experiment`."""
        return cls(Tracker.open(uri, experiment), warm=warm)

    def parent_run(self, study: optuna.Study, run_name: str, params: Mapping[str, object], *,
                   storage: str | None, ends_study: bool = True, sync: bool = True, reopen: bool = True) -> None:
        """`sync`: log the trials the store missed now; `reopen`: mark a finished study run RUNNING again."""
        self.study = study
        self.parent = self.store.parent_run(study, run_name, params, sync=sync, storage=storage, reopen=reopen)
        if ends_study and self._warm:
            self.warm_up = WarmUp().start()

    def parent_run_id(self, timeout: float = 120.0) -> str | None:
        return self.parent

    def start_trial(self, number: int, study_name: str, *, start_ms: int | None = None) -> None:
        self.runs[number] = (self.store.start_trial(self.parent, number, study_name, start_ms=start_ms)
                             if self.parent else None)

    def run_id(self, number: int, *, final: bool = False) -> str | None:
        return self.runs.get(number)

    def log_params(self, number: int, params: Mapping[str, object]) -> None:
        self.store.log_params(self.runs.get(number), params)

    def log_epoch(self, number: int, step: int, metrics: Mapping[str, float], *, at_ms: int | None = None) -> None:
        self.store.log_epoch(self.runs.get(number), step, metrics, at_ms=at_ms)

    def end_trial(self, number: int, status: str, tags: Mapping[str, str], *, end_ms: int | None = None) -> None:
        self.store.end_trial(self.runs.pop(number, None), status, tags, end_ms=end_ms)

    def end_dead_trial(self, run_id: str | None, number: int, status: str, tags: Mapping[str, str]) -> None:
        self.store.end_dead_trial(run_id, number, status, tags)

    def log_summary(self, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Metric

        if not self.parent:
            return
        now = int(time.time() * 1000)
        self.store.now_or_later("logging the study's summary", log_batches, self.store.client, self.parent,
                                metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], tags=tags)
        self._name_roles(int(tags["best_trial"]) if str(tags.get("best_trial", "")).isdigit() else None)

    def _name_roles(self, best: int | None) -> None:
        """The best trial's run and the baseline's get a name and a `regsearch.role` tag of their own."""
        for trial in self.study.get_trials(deepcopy=False) if self.study is not None else ():
            roles = [role for role, holds in (("baseline", is_baseline(trial)), ("best", trial.number == best))
                     if holds]
            run_id = trial.user_attrs.get(RUN_ID_ATTR)
            if roles and run_id:
                name = "-".join((f"trial-{trial.number}", *roles))
                self.store.now_or_later(f"naming run {name}", self.store.client.update_run, run_id, name=name)
                self.store.now_or_later(f"naming run {name}", log_batches, self.store.client, run_id,
                                        tags={"regsearch.role": "+".join(roles)})

    def on_study_run(self, study: optuna.Study) -> str | None:
        """Add to the study's run as it is (none is made, none reopened): what a later confirmation logs."""
        self.study, self.parent = study, self.store.find_parent(study)
        return self.parent

    def log_model(self, predictor: Predictor, example: Example, register: Registration | None = None, *,
                  name: str = "best_model", about: Mapping[str, object] | None = None) -> None:
        """A pyfunc taking raw inputs (see `_pyfunc`) on the study run, logged as `name`, which becomes the study's
        model (`MODEL_ATTR`, with `about` added); with `register`, a registered version."""
        if self.parent:
            self.store.now_or_later(f"logging the {name.replace('_', ' ')}", self._log_model, self.parent,
                                    predictor, example, register, name, about)

    def _log_model(self, run_id: str, predictor: Predictor, example: Example, register: Registration | None,
                   name: str = "best_model", about: Mapping[str, object] | None = None) -> None:
        import mlflow

        from regsearch.tracking._pyfunc import saving

        with _process_uri(self.uri), mlflow.start_run(run_id=run_id, nested=True), saving():
            info = mlflow.pyfunc.log_model(name=name, **model_save_options(predictor, example))
        if self.study is not None:  # for the user, at the end of `optimize`
            self.study.set_user_attr(MODEL_ATTR, {"uri": info.model_uri, "run_id": run_id,
                                                  "experiment_id": self.store.experiment_id, **(about or {})})
        if register is not None:
            self.store.now_or_later(f"registering the {name.replace('_', ' ')} as {register[0]!r}", self._register,
                                    run_id, info.model_id, *register)

    def _register(self, run_id: str, model_id: str, name: str, tags: Mapping[str, str]) -> None:
        """A new version of the registered model `name` (made if missing) for the logged model `model_id`; not
        `mlflow.register_model`, which prints."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode

        client = self.store.client
        try:
            client.create_registered_model(name)
        except MlflowException as exc:  # an earlier study (or another) registered it: this is a new version
            if exc.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
                raise
        with _process_uri(self.uri):  # MLflow resolves a `models:/` source through it, not the client's URI
            client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=dict(tags),
                                        model_id=model_id)

    def log_pareto_front(self, front: Sequence[Mapping[str, object]]) -> None:
        """`pareto_front.json` (one row per trial) and its size on the study run."""
        from mlflow.entities import Metric

        if self.parent:
            size = Metric("pareto_front_size", float(len(front)), int(time.time() * 1000), 0)
            self.store.now_or_later("logging the Pareto front", log_batches, self.store.client, self.parent,
                                    metrics=[size])
            self.store.now_or_later("logging the Pareto front", self.store.client.log_dict, self.parent,
                                    {"trials": [dict(row) for row in front]}, "pareto_front.json")

    def log_report(self) -> None:
        if not self.parent or self.study is None:
            return
        if self.warm_up is not None:
            self.warm_up.wait()
        from regsearch import report as _report

        try:
            with no_gc():
                page = _report.render(self.study, "html")
        except Exception as exc:  # drawing, not MLflow, failed: say so in its own words
            logger.warning("the study's report was not drawn, so it is not on the MLflow run: %s", error_gist(exc))
            return
        name = _report.file_name(self.study.study_name, "html")
        self.store.now_or_later(f"logging {name}", self.store.client.log_text, self.parent, page.decode(), name)

    def end_parent(self, status: str = "FINISHED") -> None:
        if self.parent:
            self.store.now_or_later("ending the study run", self.store.client.set_terminated, self.parent,
                                    status=status)

    def close(self, *, wait: bool = True) -> int | None:
        try:
            return self.store.close()
        finally:
            if self.warm_up is not None:
                self.warm_up.clean()


@contextlib.contextmanager
def _process_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for the block (its fluent API and the model registry read
    it), and put back after."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
