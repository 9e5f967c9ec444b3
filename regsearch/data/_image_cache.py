"""Decoded images in one uint8 N×C×H×W file under the cache folder, decoded once, by one process, in parallel.

The file is `HEADER | pixels | a 16-byte digest per image | FOOTER`; header and footer repeat N, C, H, W and the
footer holds a checksum of the header and the digests. It is written to a temporary name, flushed to disk and then
renamed: a reader sees a whole file or none. A file whose length, footer or checksum does not agree (a torn copy,
a disk that filled) is decoded again, never used. Other processes wait for the decoding one under a file lock.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import multiprocessing
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regsearch._errors import DataError
from regsearch.data._decode import Decoding, UnreadableImage, decode_file

logger = logging.getLogger("regsearch")

MAGIC, END = b"RSIMAGE1", b"RSIMGEND"
_FIELDS = struct.Struct("<8s4Q")  # magic, N, C, H, W
HEADER = 64
FOOTER = 64
DIGEST = 16
PARALLEL_FROM = 64
"""Fewer images than this are decoded in this process: starting worker processes would cost more."""

_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def cache_root() -> Path:
    """$REGSEARCH_CACHE, else the user's cache folder (~/.cache/regsearch): downloads and decoded images."""
    root = os.environ.get("REGSEARCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "regsearch")
    return Path(root)


@dataclass(frozen=True)
class CacheFile:
    """A complete cache file: where it is, its images' shape and count (the pixels start at HEADER)."""

    path: Path
    n: int
    shape: tuple[int, int, int]

    def pixels(self) -> np.ndarray:
        """The images as a read-only memory map (N, C, H, W): pages are read as rows are indexed, and shared."""
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=HEADER, shape=(self.n, *self.shape))

    def digests(self) -> np.ndarray:
        """One 16-byte digest per image (of the file's bytes, or of a decoded item's pixels), as (N, 16) uint8."""
        with open(self.path, "rb") as f:
            f.seek(HEADER + self.n * int(np.prod(self.shape)))
            return np.frombuffer(f.read(self.n * DIGEST), dtype=np.uint8).reshape(self.n, DIGEST)


def _expected_size(n: int, shape: tuple[int, int, int]) -> int:
    return HEADER + n * int(np.prod(shape)) + n * DIGEST + FOOTER


def open_complete(path: Path) -> CacheFile | None:
    """The cache file at `path` when it is whole and consistent, else None (missing, torn, or not one of ours)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER)
            if len(head) < HEADER or size < HEADER + FOOTER:
                return None
            magic, n, c, h, w = _FIELDS.unpack_from(head)
            if magic != MAGIC or size != _expected_size(n, (c, h, w)):
                return None
            f.seek(size - FOOTER - n * DIGEST)
            digests = f.read(n * DIGEST)
            foot = f.read(FOOTER)
    except OSError:
        return None
    end, *fields = _FIELDS.unpack_from(foot)
    if end != END or tuple(fields) != (n, c, h, w) or foot[_FIELDS.size:_FIELDS.size + DIGEST] != _checksum(
            head, digests):
        return None
    return CacheFile(path, n, (c, h, w))


def _checksum(head: bytes, digests: bytes) -> bytes:
    return hashlib.blake2b(head + digests, digest_size=DIGEST).digest()


def cached(key: str, n: int, decoding: Decoding, decode: Callable[[], Iterator[tuple[np.ndarray, bytes]]],
           what: str) -> CacheFile:
    """The cache file named by `key`, decoding `n` images with `decode` (pixels, digest per image, in order) when
    no complete one exists; one process decodes, others sharing the cache folder wait for it under a lock."""
    from filelock import FileLock, Timeout

    folder = cache_root() / "images"
    path = folder / f"{key}.u8"
    found = open_complete(path)
    if found is not None:
        return found
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # a folder we cannot write in: said now, not as a lock timeout
    except OSError as exc:
        raise DataError(f"cannot write the image cache in {folder}: {exc.strerror or exc} (set REGSEARCH_CACHE to "
                        f"a writable folder)") from None
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0.1)
    except Timeout:
        logger.info("%s: another process is decoding these images; waiting for it", what)
        lock.acquire()
    try:
        found = open_complete(path)
        if found is not None:
            return found
        if path.exists():
            logger.warning("%s: the cached images in %s are incomplete (a copy cut short?); decoding them again",
                           what, path)
        _write(path, n, decoding, decode(), what)
        found = open_complete(path)
        if found is None:  # written, flushed and renamed, yet not whole: the file system lost it
            raise DataError(f"the image cache {path} was written but does not read back whole")
        return found
    finally:
        lock.release()


def _write(path: Path, n: int, decoding: Decoding, items: Iterable[tuple[np.ndarray, bytes]], what: str) -> None:
    """Write the file under a temporary name, flush it to disk and rename it into place; remove it on any failure."""
    needed = _expected_size(n, decoding.shape)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise DataError(f"the image cache needs {needed / 1e6:.1f} MB in {path.parent}, which has "
                        f"{free / 1e6:.1f} MB free (free space, or set REGSEARCH_CACHE to another folder)")
    temp = path.with_name(f"{path.name}.{os.getpid()}.part")
    head = _FIELDS.pack(MAGIC, n, *decoding.shape).ljust(HEADER, b"\0")
    digests = bytearray()
    try:
        with open(temp, "wb") as f:
            f.write(head)
            count = 0
            for pixels, digest in items:
                f.write(pixels.tobytes())
                digests += digest
                count += 1
            if count != n:
                raise DataError(f"{what}: {count} images came out of {n}")
            f.write(digests)
            foot = _FIELDS.pack(END, n, *decoding.shape) + _checksum(head, bytes(digests))
            f.write(foot.ljust(FOOTER, b"\0"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as exc:
        if exc.errno in _FULL:
            raise DataError(f"the disk holding the image cache {path.parent} filled up while writing it "
                            f"({needed / 1e6:.1f} MB; free space, or set REGSEARCH_CACHE to another folder)") from None
        raise DataError(f"cannot write the image cache {path}: {exc.strerror or exc}") from None
    finally:
        temp.unlink(missing_ok=True)


def _decode_one(job: tuple[str, Decoding]) -> tuple[np.ndarray, bytes] | str:
    try:
        return decode_file(*job)
    except UnreadableImage as exc:
        return str(exc)  # a message, not the exception: the parent names the file in its own error


def decode_files(paths: list[str], decoding: Decoding, workers: int | None = None) -> Iterator[tuple[np.ndarray,
                                                                                                     bytes]]:
    """Each file's (pixels, digest) in order, decoded by a pool of processes (one per core), with a progress bar
    on a terminal; an unreadable file stops it with a DataError that names the file."""
    from tqdm import tqdm

    jobs = [(p, decoding) for p in paths]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc="decoding images", unit="img", disable=None, leave=False)
    if len(jobs) < PARALLEL_FROM or workers == 1:
        results: Iterable = map(_decode_one, jobs)
        pool = None
    else:
        methods = multiprocessing.get_all_start_methods()
        pool = multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(workers)
        results = pool.imap(_decode_one, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers))))
    try:
        for result in results:
            if isinstance(result, str):
                raise DataError(f"cannot decode image {result}")
            bar.update()
            yield result
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
