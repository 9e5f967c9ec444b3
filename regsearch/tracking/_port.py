"""The one way a study reaches MLflow: the `Tracking` protocol, and `open_tracking`, which gives one."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias, overload

if TYPE_CHECKING:
    import numpy
    import optuna
    import pandas

    from regsearch.tracking._local import LocalTracking
    from regsearch.tracking._predictor import Predictor

    Example: TypeAlias = numpy.ndarray | pandas.DataFrame | None
    """Raw inputs of the best model, the model's input example (None: none)."""

Registration = tuple[str, Mapping[str, str]]
"""(name, tags) of the registered model version the best model becomes."""


def registration(name: str | None, study_name: str, trial: int, test_acc: float | None, **tags: str
                 ) -> Registration | None:
    """The `Registration` of a study's model (of trial `trial`, its test accuracy `test_acc`), where the study asks
    for one (`name`: its `search.register_model`); `tags` are added to the version's own."""
    if name is None:
        return None
    return name, {"regsearch.study": study_name, "regsearch.best_trial": str(trial),
                  "regsearch.test_acc": str(test_acc), **tags}


class Tracking(Protocol):
    """A study's runs in one MLflow store: a study run, a child run per trial (named by its trial number).

    A failure of the store is a warning, never an error of the study: what it missed is logged from the Optuna
    storage once it answers (or by `regsearch sync`).
    """

    uri: str

    def parent_run(self, study: optuna.Study, run_name: str, params: Mapping[str, object], *,
                   storage: str | None, ends_study: bool = True) -> None:
        """Start the study: open its parent run. `ends_study`: this process logs the best model and report."""

    def parent_run_id(self, timeout: float = 120.0) -> str | None:
        """The study run's id (None when the store could not make it)."""

    def start_trial(self, number: int, study_name: str, *, start_ms: int | None = None) -> None:
        """Open trial `number`'s run, started at `start_ms` (the trial's start; else now)."""

    def run_id(self, number: int, *, final: bool = False) -> str | None:
        """Trial `number`'s run id, once known; `final`: the trial ends, wait for it a little."""

    def log_params(self, number: int, params: Mapping[str, object]) -> None:
        """A trial's parameters on its run."""

    def log_epoch(self, number: int, step: int, metrics: Mapping[str, float]) -> None:
        """One epoch's metrics of a trial, sent in batches."""

    def end_trial(self, number: int, status: str, tags: Mapping[str, str]) -> None:
        """End trial `number`'s run with MLflow `status` and the trial's outcome as `tags`."""

    def end_dead_trial(self, run_id: str | None, number: int, status: str, tags: Mapping[str, str]) -> None:
        """End the run of a trial whose process died (found by its number when `run_id` is None)."""

    def log_summary(self, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        """The study's summary (best metrics, best trial) on the study run."""

    def log_model(self, predictor: Predictor, example: Example, register: Registration | None = None) -> None:
        """The best model on the study run; with `register`, a new version of that registered model too."""

    def log_pareto_front(self, front: Sequence[Mapping[str, object]]) -> None:
        """A pareto study's front on the study run."""

    def log_report(self) -> None:
        """The study's HTML report on the study run."""

    def end_parent(self, status: str = "FINISHED") -> None:
        """End the study run."""

    def close(self, *, wait: bool = True) -> int | None:
        """Send what is queued and stop; how many finished trials MLflow lacks (None: unknown)."""


IN_PROCESS_ENV = "REGSEARCH_TRACKING_IN_PROCESS"
"""Set to 1, `optimize` logs from its own process instead of the tracking process (for benchmarks)."""


@overload
def open_tracking(uri: str, experiment: str, *, in_process: Literal[True]) -> LocalTracking: ...


@overload
def open_tracking(uri: str, experiment: str, *, in_process: bool | None = None) -> Tracking: ...


def open_tracking(uri: str, experiment: str, *, in_process: bool | None = None) -> Tracking:
    """The study's tracking on the store at `uri`, its experiment `experiment`.

    In a child process (the default for a study: MLflow's import, the store and the model logging run on another
    core while this one trains), or `in_process` (confirm and sync, which wait for the store anyway).
    Raises StorageError when the store cannot be used.
    """
    if in_process is None:
        in_process = os.environ.get(IN_PROCESS_ENV, "").strip().lower() in ("1", "true")
    if in_process:
        from regsearch.tracking._local import LocalTracking

        return LocalTracking.open(uri, experiment)
    from regsearch.tracking._process import TrackerProcess

    return TrackerProcess.start(uri, experiment)
