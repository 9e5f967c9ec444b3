"""One image, whatever its form (a file, a PIL image, an array, a tensor), as uint8 C×H×W pixels of one size.

The resize rule is one: the shorter side is scaled to `size` (antialiased), then the centre `size`×`size` square is
cut out. EXIF orientation is applied first; greyscale, palette and RGBA images become RGB (alpha dropped) unless
`channels` is 1; a GIF gives its first frame. Nothing here imports torch, so that decoding processes start fast.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""Files with these suffixes (any case) are images; any other file in an image folder is skipped and counted."""

LARGEST_DEFAULT = 64
"""The default side when none is given: the images' own (their median shorter side), at most this; small images
are never scaled up by default (that multiplies a step's cost and adds no detail)."""

SIZE_SAMPLE = 64
"""Images looked at (their headers only, evenly spaced over the listing) to find the default side."""

RULE = "shorter-side-then-centre-crop/bilinear/v1"
"""Names the resize rule in the cache key: a change of the rule must not reuse pixels decoded by the old one."""


@dataclass(frozen=True)
class Decoding:
    """How images become pixels: the square side `size` and 1 (grey) or 3 (RGB) `channels`."""

    size: int
    channels: int = 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    @property
    def key(self) -> str:
        return f"{RULE}/size={self.size}/channels={self.channels}"


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in SUFFIXES


def fit(image: Any, decoding: Decoding) -> np.ndarray:
    """A PIL image as uint8 (C, size, size): orientation, colour mode, then the resize rule."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    mode = "L" if decoding.channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert("RGBA").convert(mode) if image.mode == "P" else image.convert(mode)
    w, h = image.size
    scale = decoding.size / min(w, h)
    new = (max(decoding.size, round(w * scale)), max(decoding.size, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - decoding.size) // 2, (new[1] - decoding.size) // 2
    image = image.crop((left, top, left + decoding.size, top + decoding.size))
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def default_size(images: Sequence[Any]) -> int:
    """The side images are resized to when none is given: the median shorter side of up to `SIZE_SAMPLE` of them
    (evenly spaced, so the same listing gives the same answer), at most `LARGEST_DEFAULT`."""
    n = len(images)
    picks = [images[i * n // SIZE_SAMPLE] for i in range(SIZE_SAMPLE)] if n > SIZE_SAMPLE else \
        [images[i] for i in range(n)]
    sides = sorted(side for side in map(_shorter_side, picks) if side is not None)
    if not sides:  # none readable: the decode names the first bad one
        return LARGEST_DEFAULT
    return max(8, min(LARGEST_DEFAULT, sides[len(sides) // 2]))


def _shorter_side(image: Any) -> int | None:
    """An image's shorter side from its header (a file), its size (PIL) or its shape (an array); None: unreadable."""
    from PIL import Image

    try:
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                return min(opened.size)
        if isinstance(image, Image.Image):
            return min(image.size)
        return min(_hwc(image).shape[:2])
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError):
        return None


class UnreadableImage(Exception):
    """A file that Pillow cannot decode (corrupt, truncated, not the format its name says)."""


def decode_file(path: str, decoding: Decoding) -> tuple[np.ndarray, bytes]:
    """(pixels, a 16-byte digest of the file's bytes) for one image file; UnreadableImage names the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = Path(path).read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            _draft(image, decoding)
            image.load()  # a truncated file fails here, not halfway through the resize
            pixels = fit(image, decoding)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, UnidentifiedImageError):
            reason = "not an image Pillow can read"
        raise UnreadableImage(f"{path}: {reason}") from None
    return pixels, hashlib.blake2b(raw, digest_size=16).digest()


def _draft(image: Any, decoding: Decoding) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale where that still leaves both sides >= size (far faster for
    photos); a no-op for other formats and for images already loaded."""
    image.draft(image.mode if image.mode in ("RGB", "L") else None, (decoding.size, decoding.size))


def decode_item(image: Any, decoding: Decoding) -> np.ndarray:
    """One image given in memory: a PIL image, a uint8 array (H×W or H×W×C, as PIL gives it) or a uint8 tensor
    (C×H×W, as torch holds it), or a path to a file."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return decode_file(os.fspath(image), decoding)[0]
    if isinstance(image, Image.Image):
        _draft(image, decoding)  # a JPEG the user opened and has not loaded: decoded as its file would be
        return fit(image, decoding)
    array = _hwc(image)
    if array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (0..255); got {array.dtype}")
    if array.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image array has 1, 3 or 4 channels; got shape {array.shape}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    return fit(Image.fromarray(array[:, :, 0] if mode == "L" else array, mode), decoding)


def _hwc(image: Any) -> np.ndarray:
    """An array as H×W×C: numpy arrays are read as PIL writes them (H×W×C), tensors as torch holds them (C×H×W)."""
    is_tensor = type(image).__module__.startswith("torch")
    array = np.asarray(image.detach().cpu() if is_tensor else image)
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"an image array is H×W or H×W×C (a tensor C×H×W); got shape {array.shape}")
    return array.transpose(1, 2, 0) if is_tensor else array


def as_pixels(raw: Any, decoding: Decoding) -> np.ndarray:
    """What a user hands a logged image model, as uint8 N×C×H×W: an N×C×H×W uint8 array of the study's size as it
    is; else a path, PIL image or array, or a sequence of them (a one-column DataFrame too), each decoded."""
    if hasattr(raw, "columns") and hasattr(raw, "iloc"):  # a DataFrame, as MLflow may hand a list of paths over
        if raw.shape[1] != 1:
            raise ValueError(f"image inputs as a table have one column (paths); got {raw.shape[1]} columns")
        raw = list(raw.iloc[:, 0])
    if isinstance(raw, (str, os.PathLike)) or _is_pil(raw):
        raw = [raw]
    array = None if isinstance(raw, (list, tuple)) else np.asarray(raw.cpu() if hasattr(raw, "cpu") else raw)
    if array is not None and array.ndim == 4:
        if tuple(array.shape[1:]) != decoding.shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, decoding.shape))}) or image files; "
                             f"got {tuple(array.shape)}")
        return np.ascontiguousarray(array, dtype=np.uint8)
    items: Sequence[Any] = raw if array is None else ([array] if array.ndim in (2, 3) else list(array))
    if not len(items):
        return np.zeros((0, *decoding.shape), dtype=np.uint8)
    return np.stack([decode_item(item, decoding) for item in items])


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.")
