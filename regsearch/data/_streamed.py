"""A split of images read from the cache file as it is indexed: what training uses when the data exceeds memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


class StreamedImages:
    """Rows `rows` of a cache file's uint8 N×C×H×W images, looked like a tensor where training indexes them.

    Indexing (an int tensor of positions, or a slice) reads those images from the memory-mapped file and returns
    a uint8 tensor on `device`; nothing else is held in private memory. The page cache keeps what was read.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, path: str | Path, n: int, shape: tuple[int, int, int], rows: np.ndarray,
                 device: torch.device | str = "cpu", offset: int = 64) -> None:
        self.path = str(path)
        self.n = n
        self.image_shape = tuple(shape)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.device = torch.device(device)
        self.offset = offset
        self._map: np.ndarray | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.image_shape))

    def __len__(self) -> int:
        return len(self.rows)

    def _pixels(self) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset,
                                  shape=(self.n, *self.image_shape))
        return self._map

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        chosen = self.rows[idx]
        if np.ndim(chosen) == 0:
            chosen = np.asarray([chosen])
        order = np.argsort(chosen, kind="stable")  # the file read in its own order: fewer page faults
        out = np.empty((len(chosen), *self.image_shape), dtype=np.uint8)
        out[order] = self._pixels()[chosen[order]]
        batch = torch.from_numpy(out)
        return batch if self.device.type == "cpu" else batch.to(self.device, non_blocking=True)

    def select(self, idx: Any) -> StreamedImages:
        """The same file's rows at positions `idx`, still streamed."""
        idx = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx
        return StreamedImages(self.path, self.n, self.image_shape, self.rows[idx], self.device, self.offset)

    def join(self, other: StreamedImages) -> StreamedImages:
        """This split's rows, then `other`'s (both of one file), still streamed."""
        if other.path != self.path:
            raise ValueError("only splits of one cache file join")
        return StreamedImages(self.path, self.n, self.image_shape, np.concatenate([self.rows, other.rows]),
                              self.device, self.offset)

    def to(self, device: torch.device | str, **_: Any) -> StreamedImages:
        return StreamedImages(self.path, self.n, self.image_shape, self.rows, device, self.offset)

    def cpu(self) -> StreamedImages:
        return self.to("cpu")

    def chunks(self, size: int = 1024):
        """The split's images in order, `size` at a time (uint8 tensors on the CPU)."""
        for start in range(0, len(self.rows), size):
            yield self.cpu()[start:start + size]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}

