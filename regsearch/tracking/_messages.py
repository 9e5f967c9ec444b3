"""What the study and its tracking process say to each other: frozen dataclasses, each carried out by its type.

A message to the tracking process `apply`s itself to the child's `LocalTracking` (one method per type, no
dispatch by name) and may return a reply; `what` names it in the warning when the store refuses it.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from regsearch.tracking._local import LocalTracking
    from regsearch.tracking._port import Example, Registration

# --- replies of the tracking process -------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """MLflow takes the tracking URI (`error`: why not)."""

    error: str | None = None


@dataclass(frozen=True)
class Failed:
    """The store could not be opened: the child drops what it is sent until it is closed."""

    error: str


@dataclass(frozen=True)
class StudyRun:
    run_id: str | None


@dataclass(frozen=True)
class TrialRun:
    number: int
    run_id: str | None


@dataclass(frozen=True)
class Closed:
    """How many of the study's finished trials MLflow lacks, as the child found at its end (None: unknown)."""

    missing: int | None


Reply = Accepted | Failed | StudyRun | TrialRun | Closed

# --- messages to the tracking process ------------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    """The first message: the store, the experiment, the study's log level and its source (the main file)."""

    uri: str
    experiment: str
    level: int
    source: str


@dataclass(frozen=True)
class Close:
    """Finish what was sent, then exit."""


@dataclass(frozen=True)
class StartStudy:
    what: ClassVar[str] = "opening the study run"
    storage: str | None
    study_name: str
    run_name: str
    params: Mapping[str, object]
    ends_study: bool

    def apply(self, tracking: LocalTracking) -> Reply:
        import optuna

        from regsearch._storage import open_storage

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage))
        # not synced here: the child first carries out the messages read meanwhile (this process's own trials)
        tracking.parent_run(study, self.run_name, self.params, storage=self.storage, ends_study=self.ends_study,
                            sync=False)
        return StudyRun(tracking.parent)


@dataclass(frozen=True)
class StartTrial:
    what: ClassVar[str] = "creating a trial run"
    number: int
    study_name: str
    start_ms: int

    def apply(self, tracking: LocalTracking) -> Reply:
        tracking.start_trial(self.number, self.study_name, start_ms=self.start_ms)
        return TrialRun(self.number, tracking.run_id(self.number))


@dataclass(frozen=True)
class LogParams:
    what: ClassVar[str] = "logging parameters"
    number: int
    params: Mapping[str, object]

    def apply(self, tracking: LocalTracking) -> None:
        tracking.log_params(self.number, self.params)


@dataclass(frozen=True)
class LogEpoch:
    what: ClassVar[str] = "logging metrics"
    number: int
    step: int
    metrics: Mapping[str, float]
    at_ms: int

    def apply(self, tracking: LocalTracking) -> None:
        tracking.log_epoch(self.number, self.step, self.metrics, at_ms=self.at_ms)


@dataclass(frozen=True)
class EndTrial:
    what: ClassVar[str] = "ending a trial run"
    number: int
    status: str
    tags: Mapping[str, str]
    end_ms: int

    def apply(self, tracking: LocalTracking) -> None:
        tracking.end_trial(self.number, self.status, self.tags, end_ms=self.end_ms)


@dataclass(frozen=True)
class EndDeadTrial:
    what: ClassVar[str] = "ending a dead trial's run"
    run_id: str | None
    number: int
    status: str
    tags: Mapping[str, str]

    def apply(self, tracking: LocalTracking) -> None:
        tracking.end_dead_trial(self.run_id, self.number, self.status, self.tags)


@dataclass(frozen=True)
class LogSummary:
    what: ClassVar[str] = "logging the study's summary"
    metrics: Mapping[str, float]
    tags: Mapping[str, str]

    def apply(self, tracking: LocalTracking) -> None:
        tracking.log_summary(self.metrics, self.tags)


@dataclass(frozen=True)
class LogModel:
    """The best model, pickled by the study's process (`Predictor` by value: see `TrackerProcess.log_model`)."""

    what: ClassVar[str] = "logging the best model"
    predictor: bytes
    example: Example
    register: Registration | None

    def apply(self, tracking: LocalTracking) -> None:
        if tracking.parent is None:
            return
        if tracking.warm_up is not None:
            # all of it: unpickling a table's fitted encoders imports scikit-learn, which the report's warm-up
            # may be importing in its thread (a half-imported sklearn.base fails the model)
            tracking.warm_up.wait()
        tracking.log_model(pickle.loads(self.predictor), self.example, self.register)


@dataclass(frozen=True)
class LogParetoFront:
    what: ClassVar[str] = "logging the Pareto front"
    front: Sequence[Mapping[str, object]]

    def apply(self, tracking: LocalTracking) -> None:
        tracking.log_pareto_front(self.front)


@dataclass(frozen=True)
class LogReport:
    what: ClassVar[str] = "logging the study's report"

    def apply(self, tracking: LocalTracking) -> None:
        tracking.log_report()


@dataclass(frozen=True)
class EndStudy:
    what: ClassVar[str] = "ending the study run"
    status: str

    def apply(self, tracking: LocalTracking) -> None:
        tracking.end_parent(self.status)


Message = (StartStudy | StartTrial | LogParams | LogEpoch | EndTrial | EndDeadTrial | LogSummary | LogModel
           | LogParetoFront | LogReport | EndStudy)
