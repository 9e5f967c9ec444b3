"""What the end of a study does for the first time (saving a model, drawing a report), rehearsed while it trains."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from regsearch.tracking._port import Example
    from regsearch.tracking._predictor import Predictor

logger = logging.getLogger("regsearch")


class WarmUp:
    """What the end of the study does for the first time, done by a thread while the study trains.

    Saving the model imports MLflow's pyfunc and model code, pickles a torch model and scans the installed packages;
    the first report imports matplotlib and Optuna's importance evaluators (seconds). The best model and the report
    wait for all of it (imports in two threads at once can meet a half-imported package); neither waits longer
    than `LIMIT_S`, so a warm-up stuck on, say, a slow file system cannot keep the study run open.
    """

    LIMIT_S = 120.0
    CLEAN_WAIT_S = 5.0

    def __init__(self) -> None:
        self.scratch: str | None = None  # where the throwaway model goes; removed as the tracking process ends
        self.model_done = threading.Event()
        self._lock = threading.Lock()
        self._ended = False  # the tracking process is ending: make no folder any more
        self.thread = threading.Thread(target=self._run, name="regsearch-mlflow-warm", daemon=True)

    def start(self) -> WarmUp:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            with self._lock:
                if self._ended:
                    return
                self.scratch = tempfile.mkdtemp(prefix="regsearch-warm-")
            warm_up_model(self.scratch)
        except OSError:
            pass  # no temporary folder: the best model is saved without a rehearsal
        finally:
            self.model_done.set()
        with contextlib.suppress(Exception):
            warm_up_report()
        # what is imported and set up by now lives as long as the process: the collector need not look at it again
        # (the warm-up's own garbage is collected first, not kept for good)
        gc.collect()
        gc.freeze()

    def wait(self) -> None:
        self.thread.join(self.LIMIT_S)

    def clean(self) -> None:
        """Remove the throwaway model; a study that ended early may find it being saved: wait a little for that."""
        with self._lock:
            self._ended = True
        if self.scratch:
            self.model_done.wait(self.CLEAN_WAIT_S)
            shutil.rmtree(self.scratch, ignore_errors=True)


@contextlib.contextmanager
def no_gc():
    """No garbage collection meanwhile (collected after): matplotlib makes many cycles as it draws, and each full
    collection walked the whole of this process (torch, MLflow, SQLAlchemy): a third of a report's drawing time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def model_save_options(predictor: Predictor, example: Example) -> dict[str, object]:
    """How the best model is saved (and the warm-up's throwaway one, so that it rehearses the same path): a pyfunc
    around `predictor` (a `Predictor`), `example` its raw input example."""
    from regsearch.tracking._pyfunc import pyfunc_options

    return pyfunc_options(predictor, example)


def warm_up_model(scratch: str) -> None:
    """Save a throwaway two-number model as the best model will be saved, and what logging it imports."""
    import importlib

    with contextlib.suppress(Exception):
        import mlflow.pyfunc
        import numpy
        import torch

        from regsearch import _thirdparty
        from regsearch.tracking._predictor import Predictor
        from regsearch.tracking._pyfunc import saving

        _thirdparty.scan_installed_packages()
        predictor = Predictor(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()).eval(), "array", (2,),
                              (0, 1))
        with saving():
            mlflow.pyfunc.save_model(os.path.join(scratch, "model"),
                                     **model_save_options(predictor, numpy.zeros((2, 2), dtype="float32")))
    with contextlib.suppress(Exception):  # the run's git context, read when the model is logged
        from mlflow.tracking.context.registry import resolve_tags

        resolve_tags()
    # validating the logged model's serving input
    for name in ("mlflow.pyfunc.scoring_server", "mlflow.models.display_utils", "mlflow.tracing.processor.otel"):
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def warm_up_report() -> None:
    """Import matplotlib and Optuna's importance evaluators (scipy, scikit-learn) and draw a first figure."""
    import optuna.importance  # noqa: F401

    from regsearch import report as _report

    _report.warm_up()
