"""The best model behind the preprocessing its data had: raw inputs in, labels out (what the logged model runs).

Nothing here imports MLflow: the study's process builds a `Predictor` and pickles it (`by_value`) for the tracking
process, which logs it as a pyfunc (`regsearch.tracking._pyfunc`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from regsearch.data._decode import as_pixels

OUTPUTS = ("label", "proba")
"""What `Predictor.predict` returns: class labels, or a probability per class (a column per class)."""


class Predictor:
    """A trained model and the preprocessing regsearch fitted on the training split, applied to raw inputs.

    `kind` says what raw input it takes: "table" (a DataFrame with the table's columns, through its fitted
    preprocessor), "image" (uint8 N×C×H×W, normalised with the training split's per-channel mean/std exactly as the
    training batches were) or "array" (rows of numbers, times `scale`: digits' raw pixels 0..16 times 1/16). It
    predicts in `batch_size` chunks under `autocast` (the precision the trial was trained and tested in), so that
    the study's test split, raw, gets the study's test accuracy. Images read from files (`decoding` set) are also
    taken as file paths, PIL images or uint8 arrays, decoded and resized as the study's were.
    """

    def __init__(self, model: torch.nn.Module, kind: str, shape: tuple[int, ...], labels: tuple, *,
                 scale: float | None = None, image_scale: torch.Tensor | None = None,
                 image_shift: torch.Tensor | None = None, preprocessor: Any = None, columns: tuple | None = None,
                 autocast: torch.dtype | None = None, batch_size: int = 1024, decoding: Any = None) -> None:
        self.model = model
        self.kind = kind
        self.shape = shape
        self.labels = labels  # the label of each class id (not `classes`: see `_labels`)
        self.scale = scale
        self.image_scale = image_scale
        self.image_shift = image_shift
        self.preprocessor = preprocessor
        self.columns = columns
        self.autocast = autocast
        self.batch_size = batch_size
        self.decoding = decoding

    @classmethod
    def of(cls, model: torch.nn.Module, data: Any, *, autocast: torch.dtype | None = None,
           batch_size: int = 1024) -> Predictor:
        """The predictor of `model` trained on `data` (a `TensorData`), on the CPU."""
        labels = _labels(data)
        common = {"autocast": autocast, "batch_size": batch_size}
        model = model.cpu().eval()
        if data.preprocessor is not None:
            return cls(model, "table", (), labels, preprocessor=data.preprocessor,
                       columns=tuple(data.columns) if data.columns is not None else None, **common)
        if data.is_image:  # the same arithmetic as `Batcher`, so that the inputs are the same floats
            std, mean = data.std.cpu(), data.mean.cpu()
            return cls(model, "image", data.input_shape, labels, image_scale=(1.0 / (255.0 * std)).view(1, -1, 1, 1),
                       image_shift=(mean / std).view(1, -1, 1, 1), decoding=data.decoding, **common)
        return cls(model, "array", data.input_shape, labels, scale=data.scale, **common)

    def inputs(self, raw: Any) -> torch.Tensor:
        """Raw inputs as the model's input tensor (float32, on the CPU)."""
        if self.kind == "table":
            import pandas as pd

            frame = raw if isinstance(raw, pd.DataFrame) else pd.DataFrame(raw)
            return torch.from_numpy(np.asarray(self.preprocessor.transform(frame), dtype=np.float32))
        if self.kind == "image" and getattr(self, "decoding", None) is not None:
            raw = as_pixels(raw, self.decoding)
        array = np.asarray(raw.cpu() if isinstance(raw, torch.Tensor) else raw)
        if array.ndim != len(self.shape) + 1 or tuple(array.shape[1:]) != tuple(self.shape):
            raise ValueError(f"expected inputs of shape (N, {', '.join(map(str, self.shape))}); "
                             f"got {tuple(array.shape)}")
        if self.kind == "image":
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8)).float().mul_(
                self.image_scale).sub_(self.image_shift)
        array = np.asarray(array, dtype=np.float32)
        if self.scale is not None:
            array = array * np.float32(self.scale)
        return torch.from_numpy(np.ascontiguousarray(array))

    def logits(self, raw: Any) -> torch.Tensor:
        return self.outputs(self.inputs(raw))

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for inputs already made (`inputs`): in `batch_size` chunks, under `autocast`."""
        autocast = (torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None
                    else contextlib.nullcontext())
        self.model.eval()
        with torch.no_grad(), autocast:
            return torch.cat([self.model(x[i:i + self.batch_size]).float()
                              for i in range(0, len(x), self.batch_size)]) if len(x) else torch.zeros(
                0, len(self.labels))

    def predict(self, raw: Any, output: str = "label") -> Any:
        """Class labels (a numpy array of the original label values), or with `output="proba"` a DataFrame with a
        probability column per class."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        logits = self.logits(raw)
        if output == "proba":
            import pandas as pd

            return pd.DataFrame(torch.softmax(logits, 1).numpy(), columns=list(self.labels))
        return np.asarray(self.labels)[logits.argmax(1).numpy()]

    def example(self, data: Any) -> Any:
        """Two raw inputs of the kind this predictor takes (an input example for MLflow), or None."""
        if self.kind == "table":
            return _typical_rows(self.preprocessor, self.columns)
        x = data.x_train[:2].cpu()
        if self.kind == "image":
            return x.numpy()
        return (x.numpy() / np.float32(self.scale)) if self.scale is not None else x.numpy()


def _labels(data: Any) -> tuple:
    """The label of each class id: a table's values, else the ids themselves.

    Apart, and no attribute named `classes` where `torch` is used: cloudpickle, pickling such a function by value,
    takes the name for the submodule `torch.classes` and fails on it.
    """
    return tuple(data.classes) if data.classes is not None else tuple(range(data.num_classes))


def _typical_rows(preprocessor: Any, columns: tuple) -> Any:
    """Two rows of the table's typical values (numeric medians, most frequent categories) read off the fitted
    imputers, or None when the preprocessor has none for some column."""
    import pandas as pd

    values: dict[str, Any] = {}
    for _, step in getattr(preprocessor, "steps", ()):
        for _, transformer, names in getattr(step, "transformers_", ()):
            imputer = next((s for _, s in getattr(transformer, "steps", ()) if hasattr(s, "statistics_")), None)
            if imputer is not None and not isinstance(names, str):
                values.update(zip(names, imputer.statistics_, strict=False))
    if columns is None or any(c not in values for c in columns):
        return None
    return pd.DataFrame([{c: values[c] for c in columns}] * 2)


def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots)


def travels(package: str, installed: tuple[str, ...]) -> bool:
    """Whether a top-level package's modules go with a pickled model by value: regsearch itself, and whatever is
    not installed (a user's own file next to their script, a `--plugin` file), which a fresh process elsewhere
    cannot import. Decided by where the package is: its submodules (torch.ops, named after no file) go with it."""
    if package == "regsearch":
        return True
    module = sys.modules.get(package)
    file = getattr(module, "__file__", None)
    if package == "__main__" or package in sys.stdlib_module_names or not file or not os.path.isabs(file):
        return False  # __main__ is pickled by value anyway
    path = os.path.realpath(file)
    return not path.startswith(installed) and "site-packages" not in path and "dist-packages" not in path


@contextlib.contextmanager
def by_value() -> Iterator[None]:
    """Meanwhile cloudpickle pickles what `travels` by value (undone after): the model loads where only its pip
    requirements are installed, in any folder."""
    import cloudpickle

    installed = _installed_roots()
    decided: dict[str, bool] = {}  # by package: a realpath per module would take 0.3 s
    added = []
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        if top not in decided:
            decided[top] = travels(top, installed)
        if decided[top] and isinstance(module, types.ModuleType):
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:  # already registered (a `--plugin` file), or not a module cloudpickle takes
                continue
            added.append(module)
    try:
        yield
    finally:
        for module in added:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(module)
