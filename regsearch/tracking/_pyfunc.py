"""The best model as MLflow logs it: a pyfunc whose `predict` takes raw inputs and returns labels."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from regsearch import _thirdparty
from regsearch.tracking._predictor import OUTPUTS, Predictor, by_value

if TYPE_CHECKING:
    from regsearch.tracking._port import Example


class RawInputModel(_thirdparty.unchecked_python_model()):  # it checks its inputs itself
    """`mlflow.pyfunc.load_model(uri).predict(raw)`: the best trial's predictions on raw inputs (see `Predictor`).

    `params={"output": "proba"}` returns a DataFrame with a probability column per class instead of labels.
    """


    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def predict(self, context, model_input, params=None):
        return self.predictor.predict(model_input, **(params or {}))


def pyfunc_options(predictor: Predictor, example: Example) -> dict[str, object]:
    """`mlflow.pyfunc.log_model`'s arguments for `predictor` (its input example `example`: raw inputs, or None).

    The signature holds only the `output` parameter: the inputs are checked by the predictor, which takes what a
    user has (float64 or float32 rows, integer or uint8 images, a DataFrame of strings or of numbers).
    """
    import cloudpickle
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"cloudpickle=={cloudpickle.__version__}"]
    if predictor.preprocessor is not None:
        import sklearn

        requirements.append(f"scikit-learn=={sklearn.__version__}")
    if getattr(predictor, "decoding", None) is not None:
        import PIL

        requirements.append(f"Pillow=={PIL.__version__}")
    signature = ModelSignature(params=ParamSchema([ParamSpec("output", "string", OUTPUTS[0])]))
    return {"python_model": RawInputModel(predictor), "signature": signature, "input_example": example,
            "pip_requirements": requirements}


class _Quiet(logging.Filter):
    """MLflow's notes while it saves the model: its progress, and its advice against pickling a Python object
    (our choice: it keeps loading fast)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO and "serialized using CloudPickle" not in record.getMessage()


@contextlib.contextmanager
def saving() -> Iterator[None]:
    """Around saving the pyfunc: what the model needs travels by value (`by_value`); MLflow's notes are not shown."""
    quiet = _Quiet()
    logging.getLogger("mlflow.pyfunc").addFilter(quiet)
    try:
        with by_value():
            yield
    finally:
        logging.getLogger("mlflow.pyfunc").removeFilter(quiet)
