"""What a process prepares once before its trials: plugins, data on the device, the model factory, the preflight."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from regsearch._device import native_bf16, resolve_device
from regsearch._errors import ConfigError
from regsearch._estimate import announce_slow_trials
from regsearch._preflight import preflight
from regsearch._registry import RegularizerRegistry, default_registry
from regsearch._search_space import RecordingTrial
from regsearch._spec import RESHUFFLE_GROUPS, StudySpec
from regsearch._trainer import steps_per_epoch
from regsearch._trial import Experiment, new_model, takes_trial
from regsearch._weights import pretrained
from regsearch.data._tensors import Batcher, TensorData, check_folds, load_dataset
from regsearch.models import model_factory

logger = logging.getLogger("regsearch")

def prepare(spec: StudySpec, *, data: TensorData | None = None, model: Callable[..., nn.Module] | None = None,
            data_dir: str | None = None, device: str = "auto", registry: RegularizerRegistry | None = None,
            plugins: Iterable[str] = ()) -> Experiment:
    """Load plugins, data and model factory once, and check every regularizer against them."""
    registry = registry or default_registry()
    for path in (*spec.plugins, *plugins):
        registry.load_file(path)
    regs = [(r, registry.create(r.name, r.options)) for r in spec.regularizers]
    dev = resolve_device(device)
    if spec.training.precision == "bfloat16" and not native_bf16(dev):
        logger.warning("training.precision is bfloat16, but this %s has no native bfloat16 arithmetic (on a CPU: "
                       "AVX512-BF16 or AMX), so trials may run many times slower than in float32; `auto` chooses "
                       "per device", "CPU" if dev.type == "cpu" else f"device ({dev})")
    if data is None:
        data = _load_data(spec, data_dir)
    data = data.to(dev)
    if spec.search.reshuffle and data.group_repeats:
        raise ConfigError(RESHUFFLE_GROUPS)
    spec = epochs_from_steps(spec, len(data.y_train))
    if spec.search.confirm is not None and spec.search.confirm.folds is not None:
        check_folds(data, spec.search.confirm.folds)  # before the search, not after it
    build = model or model_factory(spec.model.name, spec.model.options, data.input_shape, data.num_classes,
                                   spec.searched)
    if spec.model.weights is not None:
        build = pretrained(build, spec.model.weights, takes_trial(build))
    exp = Experiment(spec, data, build, regs, dev, Batcher(data).inputs(data.x_train[:4]))
    bare = _check_model(exp)
    announce_slow_trials(exp, preflight(exp, registry), bare)
    return exp


def epochs_from_steps(spec: StudySpec, n_train: int) -> StudySpec:
    """A study whose budget is `training.steps` trains the fewest epochs of `n_train` examples that hold them."""
    t = spec.training
    if t.steps is None:
        return spec
    epochs = math.ceil(t.steps / max(1, steps_per_epoch(n_train, t.batch_size)))  # steps >= 1: at least one
    return spec.replace(training=t.replace(epochs=epochs))


def _load_data(spec: StudySpec, data_dir: str | None) -> TensorData:
    """The study's data: the user's table (its keys from the spec) or a built-in dataset (CIFAR from data_dir)."""
    d = spec.data
    if d.name == "table":
        from regsearch.data.table import load_table

        return load_table(d.path, d.target, test_path=d.test_path, features=d.features, categorical=d.categorical,
                          id_columns=d.id_columns, val_fraction=d.val_fraction, seed=spec.seed,
                          train_size=d.train_size, group_repeats=bool(d.group_repeats))
    if d.name == "images":
        return _load_images(spec, data_dir)
    return load_dataset(d.name, val_fraction=d.val_fraction, seed=spec.seed, train_size=d.train_size,
                        data_dir=data_dir)


def _load_images(spec: StudySpec, data_dir: str | None) -> TensorData:
    """The user's images: `data.path`, else the `--data-dir` folder."""
    from regsearch.data.images import load_images

    d = spec.data
    path = d.path or data_dir
    if path is None:
        raise ConfigError("data.name images needs the images: --set data.path=FOLDER (a subfolder of images per "
                          "class) or a CSV/TSV of paths and labels, or --data-dir FOLDER")
    given = {"image_size": d.image_size, "channels": d.channels, "path_column": d.path_column, "target": d.target}
    return load_images(path, test_path=d.test_path, val_fraction=d.val_fraction, seed=spec.seed,
                       train_size=d.train_size, group_repeats=bool(d.group_repeats), in_memory=d.in_memory,
                       **{key: value for key, value in given.items() if value is not None})  # else its defaults


def _check_model(exp: Experiment) -> nn.Module:
    """The model takes the data's inputs and returns (batch, classes) logits, or the study stops here; a factory
    taking the trial is asked with a recording one, and what it asks is kept (`exp.model_space`)."""
    takes_trial(exp.build_model)  # a factory of two arguments is refused as such, not as a model failing the data
    recording = RecordingTrial()
    try:
        probe = new_model(exp, recording).to(exp.device)
        probe.eval()
        with torch.no_grad():
            out = probe(exp.example)
    except ConfigError:  # said already (weights that do not fit)
        raise
    except Exception as exc:
        raise ConfigError(f"the model cannot take this data (inputs of shape {tuple(exp.data.input_shape)}): "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != exp.data.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model must return logits of shape (batch, {exp.data.num_classes}); got {shape}")
    exp.model_space = dict(recording.distributions)
    return probe

