"""The CIFAR-10 binary loader, TensorData's checks and split, and the batched flip/translate augmentation."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from regsearch._errors import DataError
from regsearch.data import cifar
from regsearch.data._tensors import TensorData, flip_translate, load_dataset
from regsearch.data.cifar import ARCHIVE, FOLDER, RECORD, TEST_FILE, TRAIN_FILES, load_cifar10

PER_FILE = 4
"""Records in each tiny batch file the tests write (the real files hold 10,000)."""


# --------------------------------------------------------------------------------------------------------------
# tiny CIFAR-10 archives and folders in the official layout


def records(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    """`n` random records: pixels as the file holds them (n, 3072), labels (n,), and the file's bytes."""
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    raw = np.concatenate([labels[:, None], pixels], axis=1).tobytes()
    assert len(raw) == n * RECORD
    return pixels, labels, raw


def cifar_files(seed: int = 0, n: int = PER_FILE) -> tuple[dict[str, bytes], tuple[np.ndarray, ...]]:
    """The six batch files' bytes, and what load_cifar10 must return for them (x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(seed)
    files, train_x, train_y = {}, [], []
    for name in TRAIN_FILES:
        pixels, labels, files[name] = records(rng, n)
        train_x.append(pixels)
        train_y.append(labels)
    test_pixels, test_labels, files[TEST_FILE] = records(rng, n)
    expected = (np.concatenate(train_x), np.concatenate(train_y), test_pixels, test_labels)
    return files, expected


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    """root/cifar-10-batches-bin/<files>; returns root/cifar-10-batches-bin."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return folder


def tar_gz(files: dict[str, bytes], prefix: str = f"{FOLDER}/") -> bytes:
    """A .tar.gz of the files under `prefix`, byte for byte the same on every run (mtime 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        folder = tarfile.TarInfo(prefix.rstrip("/") or ".")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, raw in {"batches.meta.txt": b"airplane\nautomobile\n", **files}.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return gzip.compress(buf.getvalue(), mtime=0)


def write_archive(path: Path, files: dict[str, bytes], **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_gz(files, **kwargs))
    return path


def assert_loaded(got: tuple[np.ndarray, ...], expected: tuple[np.ndarray, ...]) -> None:
    x_train, y_train, x_test, y_test = got
    want_x_train, want_y_train, want_x_test, want_y_test = expected
    assert x_train.dtype == np.uint8 and x_test.dtype == np.uint8
    assert x_train.shape == (len(TRAIN_FILES) * PER_FILE, 3, 32, 32)
    assert x_test.shape == (PER_FILE, 3, 32, 32)
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    np.testing.assert_array_equal(y_train, want_y_train)
    np.testing.assert_array_equal(y_test, want_y_test)
    # the file holds 1024 red bytes, then 1024 green, then 1024 blue, each plane row by row: (C, H, W)
    np.testing.assert_array_equal(x_train.reshape(len(x_train), -1), want_x_train)
    np.testing.assert_array_equal(x_test.reshape(len(x_test), -1), want_x_test)


@pytest.fixture
def tiny():
    return cifar_files()


# --------------------------------------------------------------------------------------------------------------
# reading the official layout


def test_parse_from_tar_gz(tmp_path, tiny):
    files, expected = tiny
    archive = write_archive(tmp_path / "tiny-cifar.tar.gz", files)
    assert_loaded(load_cifar10(archive), expected)
    assert_loaded(load_cifar10(str(archive)), expected)


def test_parse_from_extracted_folder_and_its_parent(tmp_path, tiny):
    files, expected = tiny
    folder = write_folder(tmp_path / "data", files)
    assert_loaded(load_cifar10(folder), expected)
    assert_loaded(load_cifar10(tmp_path / "data"), expected)


def test_folder_holding_an_archive(tmp_path, tiny):
    files, expected = tiny
    write_archive(tmp_path / "data" / ARCHIVE, files)
    # named like the official archive, so the published checksum applies: our tiny archive fails it
    with pytest.raises(DataError, match="checksum mismatch"):
        load_cifar10(tmp_path / "data")
    # with the right md5 given, the same archive is read
    md5 = hashlib.md5((tmp_path / "data" / ARCHIVE).read_bytes()).hexdigest()
    assert_loaded(load_cifar10(tmp_path / "data", md5=md5), expected)


def test_pixel_bytes_land_in_chw_order(tmp_path):
    """One record with a single lit byte at (channel 2, row 5, column 7): it must come back at [2, 5, 7]."""
    rng = np.random.default_rng(1)
    files, _ = cifar_files()
    record = np.zeros(RECORD, dtype=np.uint8)
    record[0] = 3
    record[1 + 2 * 1024 + 5 * 32 + 7] = 255
    record[1 + 0 * 1024 + 31 * 32 + 0] = 17  # red, last row, first column
    files[TEST_FILE] = record.tobytes() + records(rng, 2)[2]
    x_train, y_train, x_test, y_test = load_cifar10(write_folder(tmp_path, files))
    assert y_test[0] == 3
    assert x_test[0, 2, 5, 7] == 255 and x_test[0, 0, 31, 0] == 17
    assert np.count_nonzero(x_test[0]) == 2
    assert x_test.shape == (3, 3, 32, 32)


def test_only_some_training_batches(tmp_path, tiny):
    files, expected = tiny
    del files["data_batch_4.bin"], files["data_batch_5.bin"]
    x_train, y_train, x_test, _ = load_cifar10(write_folder(tmp_path, files))
    assert x_train.shape == (3 * PER_FILE, 3, 32, 32)
    np.testing.assert_array_equal(y_train, expected[1][: 3 * PER_FILE])


def test_matching_md5_is_accepted(tmp_path, tiny):
    files, expected = tiny
    archive = write_archive(tmp_path / "mine.tar.gz", files)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    assert cifar.md5sum(archive) == md5
    assert_loaded(load_cifar10(archive, md5=md5), expected)


# --------------------------------------------------------------------------------------------------------------
# damaged or missing data: always a DataError that says what is wrong


@pytest.mark.parametrize("where", ["folder", "archive"])
@pytest.mark.parametrize("size", [3 * RECORD - 1, 2 * RECORD + 100, RECORD // 2, 0])
def test_truncated_batch_file(tmp_path, tiny, where, size):
    files, _ = tiny
    files["data_batch_3.bin"] = (files["data_batch_3.bin"] * 3)[:size]
    path = write_folder(tmp_path, files) if where == "folder" else write_archive(tmp_path / "c.tar.gz", files)
    with pytest.raises(DataError, match=r"data_batch_3\.bin") as info:
        load_cifar10(path)
    assert f"{size} bytes" in str(info.value)


@pytest.mark.parametrize("where", ["folder", "archive"])
def test_label_out_of_range(tmp_path, tiny, where):
    files, _ = tiny
    raw = bytearray(files[TEST_FILE])
    raw[2 * RECORD] = 10  # the third record's label byte
    files[TEST_FILE] = bytes(raw)
    path = write_folder(tmp_path, files) if where == "folder" else write_archive(tmp_path / "c.tar.gz", files)
    with pytest.raises(DataError, match=r"test_batch\.bin: record 2 has label 10, outside 0-9"):
        load_cifar10(path)


def test_wrong_md5_given(tmp_path, tiny):
    files, _ = tiny
    archive = write_archive(tmp_path / "mine.tar.gz", files)
    with pytest.raises(DataError, match="checksum mismatch") as info:
        load_cifar10(archive, md5="0" * 32)
    assert "0" * 32 in str(info.value)


def test_official_name_gets_the_official_checksum(tmp_path, tiny):
    files, _ = tiny
    archive = write_archive(tmp_path / ARCHIVE, files)
    with pytest.raises(DataError, match="checksum mismatch") as info:
        load_cifar10(archive)
    assert cifar.MD5 in str(info.value)


@pytest.mark.parametrize("damage", ["first half", "first 100 bytes", "not gzip", "empty"])
def test_corrupt_or_truncated_archive(tmp_path, tiny, damage):
    files, _ = tiny
    raw = tar_gz(files)
    bad = {"first half": raw[: len(raw) // 2], "first 100 bytes": raw[:100],
           "not gzip": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
           "empty": b""}[damage]
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(bad)
    with pytest.raises(DataError, match="cannot read the archive"):
        load_cifar10(path)


def stored_gzip(data: bytes, block: int = 4096) -> tuple[bytes, list[int]]:
    """`data` gzipped as uncompressed (stored) deflate blocks of `block` bytes, laid out the same by every zlib;
    also the offset of each block's 5-byte header (BFINAL/BTYPE byte, LEN, NLEN) in the result."""
    out, headers = bytearray(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"), []
    for start in range(0, len(data), block):
        chunk = data[start:start + block]
        headers.append(len(out))
        final = start + block >= len(data)
        out += bytes([final]) + struct.pack("<HH", len(chunk), 0xFFFF ^ len(chunk)) + chunk
    out += struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    assert gzip.decompress(bytes(out)) == data
    return bytes(out), headers


def damaged_archive(tmp_path: Path, damage: str) -> tuple[Path, tuple[np.ndarray, ...]]:
    """A tiny CIFAR archive, in stored deflate blocks, with bytes damaged in the middle of data_batch_2.bin."""
    files, expected = cifar_files(n=20)  # 61,460-byte members: the damage is far from any tar header
    tar_bytes = gzip.decompress(tar_gz(files))
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        member = tar.getmember(f"{FOLDER}/data_batch_2.bin")
    raw, headers = stored_gzip(tar_bytes)
    out = bytearray(raw)
    record = member.offset_data + 10 * RECORD  # record 10 of 20 in data_batch_2.bin, in the tar
    if damage == "pixels":  # 64 pixel bytes of that record: deflate cannot notice, the gzip CRC can
        for t in range(record + 100, record + 164):
            out[headers[t // 4096] + 5 + t % 4096] ^= 0x5A
    elif damage == "block header":  # NLEN no longer the complement of LEN: zlib.error while reading the member
        out[headers[record // 4096] + 3] ^= 0xFF
    path = tmp_path / "damaged.tar.gz"
    path.write_bytes(bytes(out))
    return path, expected


def test_damaged_pixel_bytes_in_the_archive_are_detected(tmp_path):
    path, _ = damaged_archive(tmp_path, "pixels")
    with pytest.raises(gzip.BadGzipFile, match="CRC check failed"):
        gzip.decompress(path.read_bytes())
    with pytest.raises(DataError, match="cannot read the archive"):
        load_cifar10(path)


def test_damaged_deflate_stream_is_a_data_error(tmp_path):
    path, _ = damaged_archive(tmp_path, "block header")
    with pytest.raises(zlib.error, match="invalid stored block lengths"):
        gzip.decompress(path.read_bytes())
    with pytest.raises(DataError, match="cannot read the archive"):
        load_cifar10(path)


def test_archive_with_dot_slash_member_names(tmp_path, tiny):
    files, expected = tiny
    archive = write_archive(tmp_path / "dot.tar.gz", files, prefix=f"./{FOLDER}/")
    assert_loaded(load_cifar10(archive), expected)


def test_archive_without_cifar_files(tmp_path):
    path = write_archive(tmp_path / "other.tar.gz", {"readme.txt": b"hello"})
    with pytest.raises(DataError, match=r"CIFAR-10 files missing: data_batch_1\.bin, test_batch\.bin"):
        load_cifar10(path)


def test_folder_without_test_batch(tmp_path, tiny):
    files, _ = tiny
    del files[TEST_FILE]
    # data_batch_1.bin alone is enough to recognise the folder; then the test file is reported missing
    with pytest.raises(DataError, match=r"missing: test_batch\.bin"):
        load_cifar10(write_folder(tmp_path, files))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_cifar10(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_folder_without_any_cifar_data(tmp_path):
    (tmp_path / "unrelated.txt").write_text("x")
    with pytest.raises(DataError, match=rf"no CIFAR-10 data in .*{ARCHIVE}"):
        load_cifar10(tmp_path)


def test_no_data_dir_offline_with_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REGSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(cifar.OFFLINE_ENV, "1")
    monkeypatch.setattr(cifar.urllib.request, "urlopen", _no_network)
    assert cifar.cache_dir() == tmp_path / "cache" / "cifar10"
    with pytest.raises(DataError, match="--data-dir") as info:
        load_cifar10()
    assert "downloads are off" in str(info.value)
    assert not (tmp_path / "cache" / "cifar10" / ARCHIVE).exists()


def test_cached_archive_is_checked_against_the_official_checksum(tmp_path, monkeypatch, tiny):
    files, _ = tiny
    monkeypatch.setenv("REGSEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(cifar.urllib.request, "urlopen", _no_network)
    write_archive(tmp_path / "cifar10" / ARCHIVE, files)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_cifar10()


def _no_network(*args, **kwargs):
    raise AssertionError("the test tried to download")


# --------------------------------------------------------------------------------------------------------------
# the shared real sample


def test_real_sample(cifar_sample):
    x_train, y_train, x_test, y_test = load_cifar10(cifar_sample)
    assert x_train.shape == (5000, 3, 32, 32) and x_test.shape == (1000, 3, 32, 32)
    assert x_train.dtype == np.uint8 and x_test.dtype == np.uint8
    assert y_train.shape == (5000,) and y_test.shape == (1000,)
    assert set(np.unique(y_train)) == set(range(10)) and set(np.unique(y_test)) == set(range(10))
    # real photographs: neither blank nor constant, and spread over the byte range
    assert 60 < x_train.mean() < 200 and x_train.std() > 30
    assert len(np.unique(x_train.reshape(len(x_train), -1), axis=0)) == len(x_train)


def test_real_sample_as_a_dataset(cifar_sample):
    data = load_dataset("cifar10", val_fraction=0.1, seed=0, train_size=1000, data_dir=cifar_sample)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (900, 100, 1000)
    assert data.is_image and data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert data.x_train.dtype == data.x_val.dtype == data.x_test.dtype == torch.uint8
    assert data.mean.shape == (3,) and torch.all((data.mean > 0.2) & (data.mean < 0.8))


# --------------------------------------------------------------------------------------------------------------
# TensorData.from_arrays


def images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 images whose first two pixels spell out the row's index (to follow rows through the split)."""
    x = np.random.default_rng(seed).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    return x


def row_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()


@pytest.mark.parametrize("x, y, match", [
    (np.zeros((10, 4), np.float32), np.zeros(9, np.int64), "x_train has 10 rows but y_train has 9"),
    (np.zeros((10, 4), np.float32), np.zeros(10, np.float32), "integer class labels"),
    (np.zeros((10, 4), np.float32), np.zeros(10, np.float64), "integer class labels"),
    (np.zeros((10, 4), np.float32), np.zeros(10, bool), "integer class labels"),
    (np.zeros((10, 4), np.float32), np.zeros((10, 1), np.int64), "integer class labels"),
    (np.zeros((10, 4), np.int64), np.zeros(10, np.int64), "floating point"),
    (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), "empty"),
    ([[0.0, 1.0]] * 10, [0] * 10, "expected a torch tensor or numpy array"),
])
def test_from_arrays_rejects_bad_input(x, y, match):
    with pytest.raises(DataError, match=match):
        TensorData.from_arrays(x, y)


def test_from_arrays_rejects_mismatched_test_split():
    x, y = np.zeros((10, 4), np.float32), np.zeros(10, np.int64)
    with pytest.raises(DataError, match="x_test has 5 rows but y_test has 4"):
        TensorData.from_arrays(x, y, np.zeros((5, 4), np.float32), np.zeros(4, np.int64))
    with pytest.raises(DataError, match="give both or neither"):
        TensorData.from_arrays(x, y, np.zeros((5, 4), np.float32))
    with pytest.raises(DataError, match=r"x_test rows have shape \(3,\)"):
        TensorData.from_arrays(x, y, np.zeros((5, 3), np.float32), np.zeros(5, np.int64))


@pytest.mark.parametrize("y_train, y_test, num_classes", [
    ([0, 1, 2, 10], None, 10),
    ([0, 1, 2, 3], [0, 10], 10),
    ([0, 1, -1, 3], None, None),
    ([0, 1, 2, 3], [-2, 0], None),
    ([0, 1, 2, 3], None, 3),
])
def test_from_arrays_rejects_labels_out_of_range(y_train, y_test, num_classes):
    y = np.array(y_train * 5, dtype=np.int64)
    x = np.zeros((len(y), 4), np.float32)
    yt = None if y_test is None else np.array(y_test, dtype=np.int64)
    xt = None if yt is None else np.zeros((len(yt), 4), np.float32)
    with pytest.raises(DataError, match=r"labels must be in \[0, "):
        TensorData.from_arrays(x, y, xt, yt, num_classes=num_classes)


def test_from_arrays_accepts_uint8_and_int32_labels_and_counts_classes():
    x = np.zeros((20, 4), np.float64)
    data = TensorData.from_arrays(x, np.arange(20, dtype=np.uint8) % 4)
    assert data.num_classes == 4 and data.y_train.dtype == torch.int64 and data.x_train.dtype == torch.float32
    data = TensorData.from_arrays(torch.zeros(20, 4), torch.arange(20, dtype=torch.int32) % 4, num_classes=7)
    assert data.num_classes == 7


def test_split_is_seeded_disjoint_and_covers_the_data():
    n = 300
    x, y = images(n), np.arange(n) % 10
    data = TensorData.from_arrays(x, y, images(50, seed=1), np.arange(50) % 10, val_fraction=0.2, seed=3)
    train, val = row_ids(data.x_train), row_ids(data.x_val)
    assert len(val) == 60 and len(train) == 240
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(n))
    # each row keeps its own label and pixels
    np.testing.assert_array_equal(data.y_train.numpy(), y[train])
    np.testing.assert_array_equal(data.x_val.numpy(), x[val])
    # images stay uint8 in every split; mean/std are per channel
    assert data.x_train.dtype == data.x_val.dtype == data.x_test.dtype == torch.uint8
    assert data.is_image and data.input_shape == (3, 8, 8)
    assert data.mean.shape == data.std.shape == (3,)
    # the same seed gives the same split, another seed another one
    again = TensorData.from_arrays(x, y, val_fraction=0.2, seed=3)
    assert row_ids(again.x_train) == train and row_ids(again.x_val) == val
    other = TensorData.from_arrays(x, y, val_fraction=0.2, seed=4)
    assert row_ids(other.x_val) != val
    assert sorted(row_ids(other.x_train) + row_ids(other.x_val)) == list(range(n))


def test_train_size_takes_a_seeded_subset():
    n = 300
    x, y = images(n), np.arange(n) % 10
    data = TensorData.from_arrays(x, y, val_fraction=0.1, seed=0, train_size=100)
    train, val = row_ids(data.x_train), row_ids(data.x_val)
    assert (len(train), len(val)) == (90, 10)
    assert not set(train) & set(val) and len(set(train + val)) == 100
    assert set(train + val) <= set(range(n))
    again = TensorData.from_arrays(x, y, val_fraction=0.1, seed=0, train_size=100)
    assert row_ids(again.x_train) == train


def test_too_few_examples_to_split():
    with pytest.raises(DataError, match="too few"):
        TensorData.from_arrays(np.zeros((2, 4), np.float32), np.array([0, 1]))


# --------------------------------------------------------------------------------------------------------------
# flip_translate


def shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[c, i, j] = img[c, i + dy, j + dx], zero where that falls outside the image."""
    _, h, w = img.shape
    out = torch.zeros_like(img)
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[:, yd, xd] = img[:, ys, xs]
    return out


def test_shift_reference():
    img = torch.arange(1, 10).view(1, 3, 3)
    assert shift(img, 1, 0).tolist() == [[[4, 5, 6], [7, 8, 9], [0, 0, 0]]]
    assert shift(img, 0, -1).tolist() == [[[0, 1, 2], [0, 4, 5], [0, 7, 8]]]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_flip_translate_keeps_shape_and_dtype(dtype):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32)).to(dtype)
    for pad in (0, 1, 4):
        out = flip_translate(x, pad=pad)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert not torch.equal(flip_translate(x), x)  # 16 images: some are moved


def test_flip_translate_without_padding_only_flips():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = flip_translate(x, pad=0)
    flipped = 0
    for i in range(len(x)):
        same, mirror = torch.equal(out[i], x[i]), torch.equal(out[i], x[i].flip(2))
        assert same or mirror, f"image {i} is neither itself nor its mirror"
        flipped += mirror
    assert 10 < flipped < 54  # about half


def test_flip_translate_is_a_shift_with_zero_fill():
    torch.manual_seed(1)
    pad = 4
    x = torch.randint(1, 256, (24, 3, 32, 32), dtype=torch.uint8)  # no zeros: fill is recognisable
    out = flip_translate(x, pad=pad)
    seen = set()
    for i in range(len(x)):
        matches = [(flip, dy, dx) for flip in (False, True) for dy in range(-pad, pad + 1)
                   for dx in range(-pad, pad + 1)
                   if torch.equal(out[i], shift(x[i].flip(2) if flip else x[i], dy, dx))]
        assert matches, f"image {i} is not a flipped/shifted copy of its input (zero fill, |shift| <= {pad})"
        assert len(matches) == 1
        seen.add(matches[0])
        flip, dy, dx = matches[0]
        assert (out[i] == 0).sum() == 3 * (32 * abs(dy) + 32 * abs(dx) - abs(dy) * abs(dx))
    assert len(seen) > 5  # shifts and flips are drawn per image, not once per batch
