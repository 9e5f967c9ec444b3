"""`Tracking` in this process: trial numbers to run ids, on a `Tracker` (the store, with its outages handled)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from regsearch._records import RUN_ID_ATTR, is_baseline
from regsearch.tracking._client import Tracker
from regsearch.tracking._store import error_gist
from regsearch.tracking._warmup import WarmUp, no_gc

if TYPE_CHECKING:
    import optuna

    from regsearch.tracking._port import Example, Registration
    from regsearch.tracking._predictor import Predictor

logger = logging.getLogger("regsearch")


class LocalTracking:
    """The study's runs logged from this process (see `Tracking`); the tracking process runs one too.

    `warm`: while the study trains, rehearse the end of the study (saving a model, drawing a report) in a thread
    (the tracking process does; in the study's own process the thread would take the training's GIL).
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
        if self.parent:
            self.store.log_summary(self.parent, metrics, tags)
            self._name_roles(int(tags["best_trial"]) if str(tags.get("best_trial", "")).isdigit() else None)

    def _name_roles(self, best: int | None) -> None:
        """The best trial's run and the baseline's get a name and a `regsearch.role` tag of their own."""
        if self.study is None:
            return
        for trial in self.study.get_trials(deepcopy=False):
            roles = [role for role, holds in (("baseline", is_baseline(trial)), ("best", trial.number == best))
                     if holds]
            run_id = trial.user_attrs.get(RUN_ID_ATTR)
            if roles and run_id:
                self.store.name_run(run_id, "-".join((f"trial-{trial.number}", *roles)),
                                    {"regsearch.role": "+".join(roles)})

    def log_model(self, predictor: Predictor, example: Example, register: Registration | None = None) -> None:
        if self.parent:
            if self.warm_up is not None:
                # all of it: unpickling a table's fitted encoders imports scikit-learn, which the report's
                # warm-up may be importing in its thread (a half-imported sklearn.base fails the model)
                self.warm_up.wait()
            self.store.log_model(self.parent, predictor, example, register)

    def log_pareto_front(self, front: Sequence[Mapping[str, object]]) -> None:
        if self.parent:
            self.store.log_pareto_front(self.parent, [dict(row) for row in front])

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
        self.store.log_artifact(self.parent, _report.file_name(self.study.study_name, "html"), page)

    def end_parent(self, status: str = "FINISHED") -> None:
        if self.parent:
            self.store.end_parent(self.parent, status)

    def close(self, *, wait: bool = True) -> int | None:
        try:
            return self.store.close()
        finally:
            if self.warm_up is not None:
                self.warm_up.clean()

