"""In-memory datasets: tensors on the training device, batches by index, augmentation as batched tensor work."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regsearch._errors import ConfigError, DataError
from regsearch.data._streamed import StreamedImages


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise DataError(f"{what}: expected a torch tensor or numpy array; got {type(value).__name__}")


@dataclass(frozen=True)
class TensorData:
    """Train / validation / test splits as tensors.

    Images are kept as uint8 (N, C, H, W) and normalised per batch (a quarter of the memory of float32);
    other inputs are float32. `mean` and `std` are per-channel statistics of the training split (images).
    A table also keeps `classes` (the label values, index = class id), the `columns` it was read from and its
    fitted `preprocessor` (`.transform(DataFrame)` turns raw rows with those columns into float32 inputs).
    `scale`, where set, is what raw inputs were multiplied by to give these (digits: 1/16 of sklearn's 0..16 pixels);
    the logged model applies it to the raw inputs a user has. `group_repeats`: rows with the same inputs were kept
    on one side of the training/validation split, and cross-validation folds keep them together too.
    Images read from files keep their `decoding` (size, channels): the logged model decodes a user's files alike.
    Their splits may be `StreamedImages` (read from the cache file as indexed) instead of tensors.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    num_classes: int
    name: str = "data"
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    classes: tuple | None = None
    preprocessor: Any | None = None
    columns: tuple | None = None
    scale: float | None = None
    group_repeats: bool = False
    decoding: Any | None = None

    @property
    def is_image(self) -> bool:
        return self.x_train.dtype == torch.uint8 and self.x_train.ndim == 4

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @classmethod
    def from_arrays(cls, x_train: Any, y_train: Any, x_test: Any = None, y_test: Any = None, *,
                    val_fraction: float = 0.2, seed: int = 0, num_classes: int | None = None,
                    train_size: int | None = None, name: str = "data") -> TensorData:
        """Split user data (float features, or uint8 images N×C×H×W) into train/validation, seeded."""
        x, y = _as_tensor(x_train, "x_train"), _as_tensor(y_train, "y_train")
        xt = None if x_test is None else _as_tensor(x_test, "x_test")
        yt = None if y_test is None else _as_tensor(y_test, "y_test")
        if (xt is None) != (yt is None):
            raise DataError("x_test and y_test go together: give both or neither")
        for xs, ys, split in ((x, y, "train"), (xt, yt, "test")):
            if xs is None:
                continue
            if xs.ndim < 2 or len(xs) != len(ys):
                raise DataError(f"x_{split} has {len(xs)} rows but y_{split} has {len(ys)} labels")
            if ys.ndim != 1 or ys.dtype.is_floating_point or ys.dtype == torch.bool or ys.is_complex():
                raise DataError(f"y_{split} must be a 1-d tensor of integer class labels; got dtype {ys.dtype} "
                                f"and shape {tuple(ys.shape)}")
            if not (xs.dtype.is_floating_point or xs.dtype == torch.uint8):
                raise DataError(f"x_{split} must be floating point (or uint8 images); got dtype {xs.dtype}")
        if xt is not None and xt.shape[1:] != x.shape[1:]:
            raise DataError(f"x_test rows have shape {tuple(xt.shape[1:])}, x_train rows {tuple(x.shape[1:])}")
        y = y.long()
        yt = None if yt is None else yt.long()
        if len(y) == 0:
            raise DataError("x_train is empty")
        found = int(max(y.max(), yt.max() if yt is not None and len(yt) else 0)) + 1
        num_classes = num_classes or found
        low = int(min(y.min(), yt.min() if yt is not None and len(yt) else 0))
        if low < 0 or found > num_classes:
            raise DataError(f"labels must be in [0, {num_classes}); got labels from {low} to {found - 1}")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1); got {val_fraction}")
        if x.dtype.is_floating_point:
            x = x.float()
            xt = None if xt is None else xt.float()
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(y), generator=gen)
        if train_size is not None:
            order = order[:train_size]
        n_val = max(1, int(round(len(order) * val_fraction)))
        if len(order) - n_val < 2:
            raise DataError(f"{len(order)} training examples are too few to split off a validation set")
        val, train = order[:n_val], order[n_val:]
        mean = std = None
        if x.dtype == torch.uint8 and x.ndim == 4:
            sample = x[train[:10_000]].float().div_(255)
            mean, std = sample.mean(dim=(0, 2, 3)), sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return cls(x[train], y[train], x[val], y[val], xt, yt, num_classes, name, mean, std)

    def to(self, device: torch.device) -> TensorData:
        move = {k: (v.to(device) if isinstance(v, (torch.Tensor, StreamedImages)) else v)
                for k, v in vars(self).items()}
        return replace(self, **move)


def check_folds(data: TensorData, k: int) -> None:
    """Refuse a fold count the pooled training and validation rows cannot fill (each fold needs 2 rows)."""
    rows = len(data.y_train) + len(data.y_val)
    if data.group_repeats:
        rows = int(pool_groups(data).max()) + 1
    what = "distinct" if data.group_repeats else "training and validation"
    if not 2 <= k <= rows // 2:
        raise ConfigError(f"folds must be between 2 and {rows // 2} (half the {rows} {what} rows); got {k}")


def pool_groups(data: TensorData) -> np.ndarray:
    """One id per distinct input row of the pooled training and validation splits."""
    if isinstance(data.x_train, StreamedImages):  # hashed a chunk at a time: the pool need not fit in memory
        joined = data.x_train.join(data.x_val)
        digests = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for chunk in joined.chunks()
                   for row in chunk.flatten(1).numpy()]
        return np.unique(np.array(digests), return_inverse=True)[1].ravel()
    pool = torch.cat([data.x_train, data.x_val]).cpu().flatten(1).contiguous().numpy()
    rows = pool.view(np.dtype((np.void, pool.dtype.itemsize * pool.shape[1]))).ravel()
    return np.unique(rows, return_inverse=True)[1].ravel()


def cv_folds(data: TensorData, k: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training and validation splits pooled and cut into `k` folds, as (train, val) row indices into the pool
    (training rows first); stratified by label, classes with fewer than `k` rows spread as they fall."""
    import warnings

    from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

    check_folds(data, k)
    labels = torch.cat([data.y_train, data.y_val]).cpu().numpy()
    counts = np.unique(labels, return_counts=True)[1]
    stratified = len(counts) > 1 and int(counts.max()) >= k
    groups = pool_groups(data) if data.group_repeats else None
    kind = StratifiedGroupKFold if groups is not None else StratifiedKFold if stratified else KFold
    splitter = kind(n_splits=k, shuffle=True, random_state=seed % 2**32)
    with warnings.catch_warnings():  # "the least populated class has only N members": expected on small data
        warnings.simplefilter("ignore", UserWarning)
        return [(torch.from_numpy(train), torch.from_numpy(val))
                for train, val in splitter.split(labels, labels, groups)]


def reshuffled(data: TensorData, seed: int) -> TensorData:
    """`data` with a fresh seeded draw of its pooled training and validation rows as the two splits (their sizes
    kept, stratified by label where every class has two rows); test split and preprocessing kept."""
    from sklearn.model_selection import train_test_split

    labels = torch.cat([data.y_train, data.y_val]).cpu().numpy()
    counts = np.unique(labels, return_counts=True)[1]
    stratify = labels if 1 < len(counts) <= len(data.y_val) and int(counts.min()) >= 2 else None
    train, val = train_test_split(np.arange(len(labels)), test_size=len(data.y_val), random_state=seed % 2**32,
                                  stratify=stratify)
    return fold_split(data, torch.from_numpy(train), torch.from_numpy(val))


def fold_split(data: TensorData, train: torch.Tensor, val: torch.Tensor) -> TensorData:
    """`data` with one fold's rows of the pool as its training and validation splits (test split, statistics and
    preprocessor kept: they were fitted on the original training split)."""
    y = torch.cat([data.y_train, data.y_val])
    train, val = train.to(y.device), val.to(y.device)
    if isinstance(data.x_train, StreamedImages):
        x = data.x_train.join(data.x_val)
        return replace(data, x_train=x.select(train), y_train=y[train], x_val=x.select(val), y_val=y[val])
    x = torch.cat([data.x_train, data.x_val])
    return replace(data, x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val])


FOLDER_DATASETS = frozenset({"cifar10", "images"})
"""The datasets read from a local folder or archive (`--data-dir`); the others need none."""


def load_dataset(name: str, *, val_fraction: float, seed: int, train_size: int | None = None,
                 data_dir: str | Path | None = None) -> TensorData:
    """A built-in dataset by name, split into train / validation / test."""
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            x.astype(np.float32) / 16.0, y, test_size=0.25, random_state=0, stratify=y)
        data = TensorData.from_arrays(x_train, y_train, x_test, y_test, val_fraction=val_fraction, seed=seed,
                                      num_classes=10, train_size=train_size, name="digits")
        return replace(data, scale=1 / 16.0)
    if name == "cifar10":
        from regsearch.data.cifar import load_cifar10

        x_train, y_train, x_test, y_test = load_cifar10(data_dir)
        return TensorData.from_arrays(x_train, y_train, x_test, y_test, val_fraction=val_fraction, seed=seed,
                                      num_classes=10, train_size=train_size, name="cifar10")
    raise ConfigError(f"unknown dataset {name!r}")


class Batcher:
    """Turns index slices of uint8 images into ready model inputs on the device: float, normalised."""

    def __init__(self, data: TensorData, *, channels_last: bool = False) -> None:
        self.data = data
        self.channels_last = channels_last
        if data.is_image:
            self.scale = (1.0 / (255.0 * data.std)).view(1, -1, 1, 1)
            self.shift = (data.mean / data.std).view(1, -1, 1, 1)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        if not self.data.is_image:
            return x
        x = x.float().mul_(self.scale).sub_(self.shift)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def flip_translate(x: torch.Tensor, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to `pad` pixels (zero fill), for a whole batch at once."""
    n, c, h, w = x.shape
    if flip:
        flipped = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flipped.view(n, 1, 1, 1), x.flip(3), x)
    if pad == 0:
        return x
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    shifted = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return shifted.gather(3, cols)
