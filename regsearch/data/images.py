"""A user's own images: a folder of class subfolders or a CSV/TSV of paths and labels, from any map-style Dataset.

The images are decoded once into the cache (`regsearch.data._image_cache`) and split as a table's rows are (one
split rule, `regsearch.data.table._split`). A data set that fits the memory budget is held in memory as uint8
tensors; a larger one is read from the cache file batch by batch (`StreamedImages`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regsearch._errors import DataError, unknown_name
from regsearch.data._decode import LARGEST_DEFAULT, SUFFIXES, Decoding, decode_item, default_size, is_image_file
from regsearch.data._image_cache import CacheFile, cache_root, cached, decode_files
from regsearch.data._streamed import StreamedImages
from regsearch.data._tensors import TensorData

logger = logging.getLogger("regsearch")

MEMORY_SHARE = 0.2
"""Images are held in memory when their pixels take at most this share of the memory available; else streamed."""

STATS_CHUNK = 2048
"""Training images read at a time for the normalisation statistics."""


@dataclass(frozen=True)
class Listing:
    """The images of a folder or a CSV: their files, class ids and the class names (index = class id)."""

    where: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple


def list_images(path: str | os.PathLike[str], *, path_column: str = "path", target: str = "label",
                classes: tuple | None = None) -> Listing:
    """A folder (class names: its sorted subfolders) or a CSV/TSV table (`path_column`, `target`); `classes` given,
    the labels are those classes' ids (a test split named with the training split's classes)."""
    where = Path(path).expanduser()
    if not where.exists():
        raise DataError(f"no images at {where}: the folder (or CSV file) does not exist")
    try:
        paths, names = _folder(where) if where.is_dir() else _table(where, path_column, target)
    except OSError as exc:  # a folder we may not list, a file gone while we read
        raise DataError(f"cannot read the images at {where}: {exc.strerror or exc} ({exc.filename})") from None
    found = tuple(sorted(set(names), key=_class_order))
    if classes is None:
        if len(found) < 2:
            raise DataError(f"{where}: one class ({found[0]!r}); nothing to learn: give at least two classes")
        classes = found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"{where}: class {unknown[0]!r} is not a class of the training images "
                        f"({', '.join(map(str, classes))})")
    ids = {c: i for i, c in enumerate(classes)}
    return Listing(where, tuple(paths), np.array([ids[n] for n in names], dtype=np.int64), tuple(classes))


def _class_order(name: Any) -> tuple:
    return (0, name, "") if isinstance(name, (int, float)) else (1, 0, str(name))


def _folder(root: Path) -> tuple[list[str], list[str]]:
    """Images under each class subfolder (recursively, in sorted order); other files are skipped and counted."""
    skipped: Counter[str] = Counter()
    folders = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            folders.append(entry)
        elif entry.is_file():
            skipped[_kind(entry.name)] += 1
    if not folders:
        if skipped:
            raise DataError(f"{root} holds files but no class folders: put each class's images in a subfolder "
                            f"named after the class ({root}/CLASS/IMAGE.jpg)")
        raise DataError(f"{root} is empty: expected a subfolder of images per class ({root}/CLASS/IMAGE.jpg)")
    paths, names = [], []
    for folder in folders:
        inside = []
        for parent, dirs, files in os.walk(folder.path, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if is_image_file(name):
                    inside.append(os.path.join(parent, name))
                else:
                    skipped[_kind(name)] += 1
        if not inside:
            raise DataError(f"{root}: the class folder {folder.name!r} has no images (image files end in "
                            f"{', '.join(SUFFIXES)})")
        paths += [os.path.abspath(p) for p in inside]
        names += [folder.name] * len(inside)
    if skipped:
        kinds = ", ".join(f"{k} ({n})" for k, n in skipped.most_common(4))
        logger.warning("%s: skipped %d files that are not images: %s", root, sum(skipped.values()), kinds)
    return paths, names


def _kind(name: str) -> str:
    return os.path.splitext(name)[1].lower() or name


def _table(path: Path, path_column: str, target: str) -> tuple[list[str], list[Any]]:
    """Paths (relative ones from the table's folder) and labels of a CSV/TSV; a path to no file names its line."""
    from regsearch.data.table import _label_keys, _label_text, _numbers, _where, read_table

    frame = read_table(path)
    for what, column in (("path column", path_column), ("label column", target)):
        if column not in frame.columns:
            raise DataError(f"{path}: {unknown_name(what, column, frame.columns)} (set data.path_column / "
                            "data.target)")
    labels = _label_text(frame, path, target)
    is_number = not _numbers(labels)[1].any()
    names = list(_label_keys(labels, is_number))
    paths = []
    for row, value in frame[path_column].items():
        value = "" if value is None else str(value).strip()
        file = path.parent / os.path.expanduser(value)
        if not value or not file.is_file():
            raise DataError(f"{path}: {_where(path, row)}: no image file at {file if value else '(empty path)'}")
        paths.append(os.path.abspath(file))
    return paths, names


def _stat_key(listing: Listing, decoding: Decoding) -> str:
    """The cache key of a listing: each file's path, size and modification time, and the decoding."""
    digest = hashlib.blake2b(decoding.key.encode(), digest_size=20)
    for p in listing.paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise DataError(f"{listing.where}: cannot read {p}: {exc.strerror or exc}") from None
        digest.update(json.dumps([p, st.st_size, st.st_mtime_ns]).encode())
    return f"files-{digest.hexdigest()}"


def decode_listing(listing: Listing, decoding: Decoding, workers: int | None = None) -> CacheFile:
    """The listing's images in the cache, decoded now if no complete file for them exists."""
    return cached(_stat_key(listing, decoding), len(listing.paths), decoding,
                  lambda: decode_files(list(listing.paths), decoding, workers), str(listing.where))


def load_images(path: str | os.PathLike[str], *, test_path: str | os.PathLike[str] | None = None,
                image_size: int | None = None, channels: int = 3, val_fraction: float = 0.2, seed: int = 0,
                train_size: int | None = None, group_repeats: bool = False, path_column: str = "path",
                target: str = "label", in_memory: bool | None = None, workers: int | None = None) -> TensorData:
    """Images from a folder (`path/CLASS/IMAGE`) or a CSV/TSV of paths and labels, decoded once into the cache.

    `test_path` (same layout) is the test split. `image_size` None: the images' own size (`default_size`: their
    median shorter side, at most 64). `in_memory`: None holds the pixels in memory when they fit the
    memory budget, else streams batches from the cache file. `group_repeats` keeps byte-identical files on one
    side of the validation split.
    """
    _checked(image_size, channels, val_fraction, train_size)
    listing = list_images(path, path_column=path_column, target=target)
    decoding = _decoding(image_size, channels, listing.paths)
    train = decode_listing(listing, decoding, workers)
    test = None
    if test_path is not None:
        test_listing = list_images(test_path, path_column=path_column, target=target, classes=listing.classes)
        test = (decode_listing(test_listing, decoding, workers), test_listing.labels)
    return from_cache(train, listing.labels, listing.classes, decoding, test=test, val_fraction=val_fraction,
                      seed=seed, train_size=train_size, group_repeats=group_repeats, in_memory=in_memory,
                      name=listing.where.stem or "images")


def _checked(image_size: int | None, channels: int, val_fraction: float, train_size: int | None) -> None:
    """The settings checked by the study spec's own rules (one validator for the study file and the API)."""
    from regsearch._spec import DataSpec

    DataSpec.from_mapping({"name": "images", "image_size": image_size, "channels": channels,
                           "val_fraction": val_fraction, "train_size": train_size}, "")


def _decoding(image_size: int | None, channels: int, images: Any) -> Decoding:
    """The decoding of `images` (paths or a Dataset's images): the size given, else their own (`default_size`)."""
    if image_size is None:
        image_size = default_size(images)
        logger.info("images resized to %d x %d (their own size, at most %d; data.image_size sets another)",
                    image_size, image_size, LARGEST_DEFAULT)
    return Decoding(image_size, channels)


def images_from_dataset(dataset: Any, *, test: Any = None, image_size: int | None = None, channels: int = 3,
                        val_fraction: float = 0.2, seed: int = 0, train_size: int | None = None,
                        group_repeats: bool = False, in_memory: bool | None = None,
                        cache_key: str | None = None) -> TensorData:
    """Images from a map-style Dataset of `(image, label)` items (PIL image, uint8 H×W×C array or C×H×W tensor;
    integer label), through the same cache. `cache_key` names the decoded pixels for reuse by later calls (change
    it when the dataset changes); without it the dataset is decoded on every call. `test`: a second such Dataset.
    Class names are `dataset.classes` where it has them; `image_size` None: as `load_images`."""
    _checked(image_size, channels, val_fraction, train_size)
    decoding = _decoding(image_size, channels, _Images(dataset))
    train, labels = _decode_dataset(dataset, decoding, cache_key, "train")
    held = None
    if test is not None:
        held = _decode_dataset(test, decoding, cache_key, "test")
    n_classes = int(max(labels.max(), held[1].max() if held is not None and len(held[1]) else 0)) + 1
    names = getattr(dataset, "classes", None)
    classes = tuple(names) if names is not None and len(names) >= n_classes else tuple(range(n_classes))
    return from_cache(train, labels, classes, decoding, test=held, val_fraction=val_fraction, seed=seed,
                      train_size=train_size, group_repeats=group_repeats, in_memory=in_memory,
                      name=type(dataset).__name__)


class _Images:
    """A Dataset's images as a sequence (for `default_size`); what is not an (image, label) pair is said later."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        return item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else None


def _decode_dataset(dataset: Any, decoding: Decoding, cache_key: str | None, part: str
                    ) -> tuple[CacheFile, np.ndarray]:
    n = len(dataset)
    if n == 0:
        raise DataError(f"the {part} dataset is empty")
    what = f"{type(dataset).__name__} ({part})"
    labels: list[int] = []

    def items():
        labels.clear()
        for i in range(n):
            item = dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise DataError(f"{what}: item {i} is not an (image, label) pair")
            image, label = item
            try:
                pixels = decode_item(image, decoding)
                labels.append(_label(label))
            except (ValueError, TypeError) as exc:
                raise DataError(f"{what}: item {i}: {exc}") from None
            yield pixels, hashlib.blake2b(pixels.tobytes(), digest_size=16).digest()
        # the labels land before the pixels' file is renamed into place: whoever finds that file finds them too
        part_file = label_file.with_name(f"{label_file.name}.{os.getpid()}.part.npy")
        np.save(part_file, np.array(labels, dtype=np.int64))
        os.replace(part_file, label_file)

    key = cache_key if cache_key is not None else f"{type(dataset).__module__}.{type(dataset).__qualname__}"
    name = hashlib.blake2b(f"{key}/{part}/{n}/{decoding.key}".encode(), digest_size=20).hexdigest()
    target = cache_root() / "images" / f"dataset-{name}.u8"
    if cache_key is None:  # no key, no reuse: a Dataset cannot be checked without decoding it
        target.unlink(missing_ok=True)  # a process still reading the old file keeps it until it closes it
    label_file = target.with_suffix(".labels.npy")
    file = cached(target.stem, n, decoding, items, what)
    found = np.load(label_file) if label_file.is_file() else None
    if found is None or len(found) != n:
        raise DataError(f"{what}: the cached labels are missing; use another cache_key")
    if found.min() < 0:
        raise DataError(f"{what}: labels must be class ids 0, 1, ...; got {found.min()}")
    return file, found


def _label(value: Any) -> int:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"the label must be a whole number (class id); got {value!r}")
    return int(value)


def from_cache(train: CacheFile, labels: np.ndarray, classes: tuple, decoding: Decoding, *,
               test: tuple[CacheFile, np.ndarray] | None, val_fraction: float, seed: int, train_size: int | None,
               group_repeats: bool, in_memory: bool | None, name: str) -> TensorData:
    """Split the cached training images (the table's split rule), compute statistics from the training split in
    chunks, and hold the splits in memory or stream them."""
    from regsearch.data.table import _split

    groups = np.unique(train.digests(), axis=0, return_inverse=True)[1].ravel() if group_repeats else None
    rows_train, rows_val = _split(labels, val_fraction, seed, train_size, groups)
    total = (len(rows_train) + len(rows_val) + (test[0].n if test else 0)) * int(np.prod(decoding.shape))
    if in_memory is None:
        import psutil

        in_memory = total <= MEMORY_SHARE * psutil.virtual_memory().available
        if not in_memory:
            logger.info("%s: %.0f MB of pixels are more than %.0f%% of the memory available; batches are read from "
                        "the cache file %s", name, total / 1e6, 100 * MEMORY_SHARE, train.path)
    x_train, x_val = (_split_of(train, rows, in_memory) for rows in (rows_train, rows_val))
    x_test = y_test = None
    if test is not None:
        x_test, y_test = _split_of(test[0], np.arange(test[0].n), in_memory), torch.from_numpy(test[1])
    mean, std = _statistics(train, rows_train)
    return TensorData(x_train, torch.from_numpy(labels[rows_train]), x_val, torch.from_numpy(labels[rows_val]),
                      x_test, y_test, len(classes), name=name, mean=mean, std=std, classes=classes,
                      group_repeats=group_repeats, decoding=decoding)


def _split_of(file: CacheFile, rows: np.ndarray, in_memory: bool) -> torch.Tensor | StreamedImages:
    streamed = StreamedImages(file.path, file.n, file.shape, rows)
    if not in_memory:
        return streamed
    return streamed[:] if len(rows) else torch.zeros((0, *file.shape), dtype=torch.uint8)


def _statistics(file: CacheFile, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (pixels / 255) of the training split, read `STATS_CHUNK` at a time."""
    total = np.zeros(file.shape[0])
    squares = np.zeros(file.shape[0])
    for chunk in StreamedImages(file.path, file.n, file.shape, np.sort(rows)).chunks(STATS_CHUNK):
        pixels = chunk.to(torch.float64).div_(255.0)
        total += pixels.sum(dim=(0, 2, 3)).numpy()
        squares += pixels.square().sum(dim=(0, 2, 3)).numpy()
    count = len(rows) * file.shape[1] * file.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32).clamp_min(1e-3)
