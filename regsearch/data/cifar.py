"""CIFAR-10 from the official binary archive, parsed directly (no pickle)."""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import posixpath
import shutil
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from regsearch._errors import DataError

logger = logging.getLogger("regsearch")

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
"""The checksum published for cifar-10-binary.tar.gz."""
ARCHIVE = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
RECORD = 1 + 3 * 32 * 32
OFFLINE_ENV = "REGSEARCH_OFFLINE"


def cache_dir() -> Path:
    """Where a downloaded archive is kept: $REGSEARCH_CACHE, else the user's cache folder."""
    from regsearch.data._image_cache import cache_root

    return cache_root() / "cifar10"


def parse_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one batch file's bytes."""
    if len(raw) == 0 or len(raw) % RECORD:
        raise DataError(f"CIFAR-10 file {name} is {len(raw)} bytes, not a whole number of {RECORD}-byte "
                        f"records: it is truncated or not a CIFAR-10 binary batch")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"CIFAR-10 file {name}: record {bad} has label {labels[bad]}, outside 0-9")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_archive(path: Path, md5: str | None) -> dict[str, bytes]:
    if md5 is not None:
        got = md5sum(path)
        if got != md5:
            raise DataError(f"{path}: checksum mismatch (md5 {got}, expected {md5}); the file is damaged or not "
                            f"the official archive: delete it and download it again")
    wanted = {f"{FOLDER}/{n}" for n in (*TRAIN_FILES, TEST_FILE)}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = posixpath.normpath(member.name)  # "./cifar-10-batches-bin/x" -> "cifar-10-batches-bin/x"
                if name in wanted and member.isfile():
                    found[name.rsplit("/", 1)[1]] = tar.extractfile(member).read()
            # the tar ends before the compressed stream does: read the rest so gzip/bz2/xz check their CRC
            while tar.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        reason = " ".join(str(exc).split())  # tarfile lists each method it tried on a line of its own
        raise DataError(f"{path}: cannot read the archive ({reason}); it is truncated or not a tar.gz") from None
    return found


def _read_folder(folder: Path) -> dict[str, bytes]:
    found = {}
    for name in (*TRAIN_FILES, TEST_FILE):
        if (folder / name).is_file():
            found[name] = (folder / name).read_bytes()
    return found


def _locate(data_dir: Path) -> tuple[str, Path]:
    if data_dir.is_file():
        return "archive", data_dir
    for folder in (data_dir / FOLDER, data_dir):
        if (folder / TEST_FILE).is_file() or (folder / TRAIN_FILES[0]).is_file():
            return "folder", folder
    if (data_dir / ARCHIVE).is_file():
        return "archive", data_dir / ARCHIVE
    if data_dir.is_dir() and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(data_dir)):
        raise DataError(f"no CIFAR-10 data in {data_dir}: expected {ARCHIVE} or the {FOLDER}/ folder; a folder of "
                        f"images in class subfolders is read by --study images --data-dir {data_dir}")
    raise DataError(f"no CIFAR-10 data in {data_dir}: expected {ARCHIVE}, or the {FOLDER}/ folder extracted "
                    f"from it (get it from {URL})")


def _download(target: Path) -> None:
    if os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes"):
        raise DataError(f"CIFAR-10 is not in {target.parent} and downloads are off ({OFFLINE_ENV} is set): "
                        f"download {URL} and pass --data-dir PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")  # workers sharing a cache may race
    logger.info("downloading CIFAR-10 (163 MB) from %s into %s", URL, target.parent)
    try:
        with urllib.request.urlopen(URL, timeout=30) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise DataError(f"CIFAR-10 is not in {target.parent} and downloading {URL} failed ({exc}); download it "
                        f"by hand and pass --data-dir PATH") from None
    got = md5sum(partial)
    if got != MD5:
        partial.unlink(missing_ok=True)
        raise DataError(f"the downloaded CIFAR-10 archive has md5 {got}, not the published {MD5}; not used")
    partial.replace(target)


def load_cifar10(data_dir: str | os.PathLike[str] | None = None, *, md5: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) from `data_dir` (archive or extracted folder), else the cache.

    With no `data_dir` the official archive is downloaded once into `cache_dir()` and used only when its md5
    matches the published one. A local archive named like the official one is checked the same way; `md5`
    checks any archive against the given checksum.
    """
    if data_dir is None:
        kind, path = "archive", cache_dir() / ARCHIVE
        if not path.is_file():
            _download(path)
        md5 = md5 or MD5
    else:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.exists():
            raise DataError(f"CIFAR-10 data folder {data_dir} does not exist")
        kind, path = _locate(data_dir)
        if kind == "archive" and path.name == ARCHIVE:
            md5 = md5 or MD5
    files = _read_archive(path, md5) if kind == "archive" else _read_folder(path)
    train_names = [n for n in TRAIN_FILES if n in files]
    if not train_names or TEST_FILE not in files:
        missing = [n for n in (*TRAIN_FILES[:1], TEST_FILE) if n not in files]
        raise DataError(f"{path}: CIFAR-10 files missing: {', '.join(missing)} (expected {FOLDER}/"
                        f"data_batch_1..5.bin and test_batch.bin)")
    train = [parse_batch(files[n], n) for n in train_names]
    x_test, y_test = parse_batch(files[TEST_FILE], TEST_FILE)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test
