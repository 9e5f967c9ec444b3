"""A user's own images: folders and CSVs of real images, the decode rules, the decode-once cache and streaming.

The real images are the shared CIFAR-10 sample's first 300 training and 100 test images, written once per session
as PNG and JPEG class-folder trees (as a user's `photos/<class>/<file>` would be).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regsearch._errors import DataError
from regsearch.data import images as images_module
from regsearch.data._decode import Decoding, as_pixels, decode_file, decode_item
from regsearch.data._image_cache import open_complete
from regsearch.data._streamed import StreamedImages
from regsearch.data.cifar import load_cifar10
from regsearch.data.images import images_from_dataset, list_images, load_images
from tests.conftest import REPO

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
N_TRAIN, N_TEST = 300, 100


@pytest.fixture(scope="session")
def cifar_trees(cifar_sample, tmp_path_factory) -> dict:
    """The sample's first images as PNG and JPEG trees (root/<format>/<split>/<class>/<index>.<ext>), with the
    pixels and labels in the order a folder lists them (classes sorted, then file names)."""
    x_train, y_train, x_test, y_test = load_cifar10(cifar_sample)
    root = tmp_path_factory.mktemp("cifar-trees")
    expected = {}
    for split, x, y in (("train", x_train[:N_TRAIN], y_train[:N_TRAIN]), ("test", x_test[:N_TEST], y_test[:N_TEST])):
        order = sorted(range(len(y)), key=lambda i: (CLASSES[y[i]], f"{i:05d}"))
        expected[split] = (x[order], y[order])
        for i in range(len(y)):
            image = Image.fromarray(x[i].transpose(1, 2, 0))
            for fmt, ext in (("png", "png"), ("jpeg", "jpg")):
                folder = root / fmt / split / CLASSES[y[i]]
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{i:05d}.{ext}", quality=95)
    return {"root": root, **expected}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("REGSEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "images").glob("*.u8"))


# --------------------------------------------------------------------------------------------------------------
# real images in, the same pixels out


def test_a_png_tree_decodes_to_the_binary_files_pixels_exactly(cifar_trees):
    listing = list_images(cifar_trees["root"] / "png" / "train")
    assert listing.classes == CLASSES
    cache = images_module.decode_listing(listing, Decoding(32))
    x, y = cifar_trees["train"]
    assert np.array_equal(cache.pixels(), x)
    assert np.array_equal(listing.labels, y)


def test_a_jpeg_tree_decodes_close_to_the_original_pixels(cifar_trees):
    cache = images_module.decode_listing(list_images(cifar_trees["root"] / "jpeg" / "test"), Decoding(32))
    x, _ = cifar_trees["test"]
    diff = np.abs(cache.pixels().astype(int) - x.astype(int))
    assert diff.mean() < 4 and diff.max() <= 255  # JPEG at quality 95: small errors, not other images
    assert np.abs(cache.pixels().astype(int) - np.roll(x, 1, axis=0).astype(int)).mean() > 20


def test_load_images_splits_like_a_table_and_normalises_with_the_training_splits_statistics(cifar_trees):
    root = cifar_trees["root"] / "png"
    data = load_images(root / "train", test_path=root / "test", image_size=32, val_fraction=0.2, seed=3)
    assert data.classes == CLASSES and data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert len(data.y_train) == 240 and len(data.y_val) == 60 and len(data.y_test) == N_TEST
    x_test, y_test = cifar_trees["test"]
    assert torch.equal(data.x_test, torch.from_numpy(x_test)) and torch.equal(data.y_test, torch.from_numpy(y_test))
    pixels = data.x_train.double() / 255
    assert torch.allclose(data.mean.double(), pixels.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(data.std.double(), pixels.std(dim=(0, 2, 3)), atol=1e-3)
    again = load_images(root / "train", image_size=32, val_fraction=0.2, seed=3)
    assert torch.equal(again.x_val, data.x_val)  # seeded
    other = load_images(root / "train", image_size=32, val_fraction=0.2, seed=4)
    assert not torch.equal(other.x_val, data.x_val) and torch.equal(other.y_val.bincount(), data.y_val.bincount())
    small = load_images(root / "train", image_size=32, train_size=100)
    assert len(small.y_train) + len(small.y_val) == 100


def test_a_csv_of_paths_and_labels_gives_the_folders_data(cifar_trees, tmp_path):
    root = cifar_trees["root"] / "png" / "train"
    listing = list_images(root)
    rows = [f"{os.path.relpath(p, tmp_path)},{CLASSES[label]}" for p, label in zip(listing.paths, listing.labels)]
    (tmp_path / "images.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    from_csv = load_images(tmp_path / "images.csv", image_size=32, seed=1)
    from_folder = load_images(root, image_size=32, seed=1)
    assert from_csv.classes == from_folder.classes
    assert torch.equal(from_csv.x_train, from_folder.x_train) and torch.equal(from_csv.y_val, from_folder.y_val)
    tsv = "\n".join(["file\tkind", *(r.replace(",", "\t") for r in rows)])
    (tmp_path / "images.tsv").write_text(tsv + "\n")
    named = load_images(tmp_path / "images.tsv", image_size=32, seed=1, path_column="file", target="kind")
    assert torch.equal(named.x_train, from_folder.x_train)


def test_a_csv_row_naming_a_missing_file_is_named_by_its_line(cifar_trees, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("path,label\n" + f"{list_images(cifar_trees['root'] / 'png' / 'test').paths[0]},cat\n"
                    "nowhere/x.png,dog\n")
    with pytest.raises(DataError, match=r"t.csv: line 3 \(the header is line 1\): no image file at .*nowhere/x.png"):
        load_images(path)


# --------------------------------------------------------------------------------------------------------------
# one decode rule for every kind of image


def write(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[:, : w // 2, 0] = 255
    pixels[:, w // 2:, 2] = 255
    return Image.fromarray(pixels)


def test_the_shorter_side_is_scaled_then_the_centre_is_cut(tmp_path):
    wide = decode_file(str(write(tmp_path / "wide.png", halves(80, 20))), Decoding(10))[0]
    assert wide.shape == (3, 10, 10)
    # the 40x10 resize keeps red on its left half; the centre 10 columns straddle the border
    assert wide[0, :, :4].min() > 200 and wide[2, :, 6:].min() > 200


@pytest.mark.parametrize("fmt,ext,options", [("JPEG", "jpg", {"quality": 98}), ("PNG", "png", {}),
                                            ("WEBP", "webp", {"lossless": True}), ("BMP", "bmp", {}),
                                            ("TIFF", "tiff", {}), ("GIF", "gif", {})])
def test_every_format_decodes(tmp_path, fmt, ext, options):
    pixels = decode_file(str(write(tmp_path / f"x.{ext}", halves(16, 16), format=fmt, **options)), Decoding(16))[0]
    assert pixels.shape == (3, 16, 16)
    assert pixels[0, :, :6].mean() > 200 and pixels[2, :, 10:].mean() > 200


def test_exif_orientation_is_applied(tmp_path):
    image = halves(16, 8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise
    pixels = decode_file(str(write(tmp_path / "turned.jpg", image, exif=exif, quality=98)), Decoding(8))[0]
    # red was left; turned clockwise it is on top
    assert pixels[0, :3].mean() > 200 and pixels[2, -3:].mean() > 200


def test_grey_palette_and_rgba_become_rgb_and_channels_1_gives_grey(tmp_path):
    grey = write(tmp_path / "g.png", Image.new("L", (8, 8), 100))
    palette = write(tmp_path / "p.gif", halves(8, 8).convert("P"))
    rgba = write(tmp_path / "a.png", Image.new("RGBA", (8, 8), (10, 20, 30, 0)))
    assert (decode_file(str(grey), Decoding(8))[0] == 100).all()
    assert decode_file(str(palette), Decoding(8))[0][0, :, :3].min() > 200
    assert (decode_file(str(rgba), Decoding(8))[0][:, 0, 0] == [10, 20, 30]).all()
    assert decode_file(str(rgba), Decoding(8, channels=1))[0].shape == (1, 8, 8)


def test_a_truncated_image_is_named(tmp_path):
    good = write(tmp_path / "ok.jpg", halves(64, 64), quality=90).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(Exception, match="cut.jpg"):
        decode_file(str(tmp_path / "cut.jpg"), Decoding(8))


def test_in_memory_images_of_every_kind_give_the_files_pixels(tmp_path):
    path = write(tmp_path / "x.png", halves(20, 12))
    from_file = decode_file(str(path), Decoding(12))[0]
    hwc = np.array(Image.open(path))
    for item in (Image.open(path), hwc, torch.from_numpy(hwc).permute(2, 0, 1), str(path)):
        assert np.array_equal(decode_item(item, Decoding(12)), from_file)
    batch = as_pixels([str(path), Image.open(path), hwc], Decoding(12))
    assert batch.shape == (3, 3, 12, 12) and (batch == from_file).all()
    assert np.array_equal(as_pixels(batch, Decoding(12)), batch)  # already the study's shape: as it is


# --------------------------------------------------------------------------------------------------------------
# the cache: decoded once, a changed folder again, a torn file never used


def copy_tree(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_second_load_reuses_the_cache_and_a_changed_folder_is_decoded_again(cifar_trees, tmp_path, own_cache):
    folder = copy_tree(cifar_trees["root"] / "png" / "test", tmp_path / "photos")
    first = load_images(folder, image_size=32)
    [made] = cache_files(own_cache)
    stamp = made.stat().st_mtime_ns
    second = load_images(folder, image_size=32)
    assert cache_files(own_cache) == [made] and made.stat().st_mtime_ns == stamp
    assert torch.equal(first.x_train, second.x_train)
    changed = min((folder / "cat").iterdir())
    write(changed, halves(32, 32))
    third = load_images(folder, image_size=32)
    assert len(cache_files(own_cache)) == 2
    assert not torch.equal(torch.cat([third.x_train, third.x_val]).sum(0), torch.cat([first.x_train,
                                                                                       first.x_val]).sum(0))
    load_images(folder, image_size=16)  # another size: another decode
    assert len(cache_files(own_cache)) == 3


def test_a_truncated_cache_file_is_decoded_again_not_used(cifar_trees, own_cache, caplog):
    folder = cifar_trees["root"] / "png" / "test"
    first = load_images(folder, image_size=32)
    [made] = cache_files(own_cache)
    whole = made.read_bytes()
    made.write_bytes(whole[: len(whole) // 2])
    assert open_complete(made) is None
    with caplog.at_level(logging.WARNING, logger="regsearch"):
        again = load_images(folder, image_size=32)
    assert "incomplete" in caplog.text
    assert made.read_bytes() == whole and torch.equal(again.x_train, first.x_train)
    at = len(whole) - 64 - 1  # the last image's digest: the footer's checksum no longer agrees
    made.write_bytes(whole[:at] + bytes([whole[at] ^ 1]) + whole[at + 1:])
    assert open_complete(made) is None


TWO = """
import sys, hashlib
from regsearch.data import _image_cache, images
calls = []
write = _image_cache._write
_image_cache._write = lambda *a: (calls.append(1), write(*a))[1]
data = images.load_images(sys.argv[1], image_size=24)
print(len(calls), hashlib.sha1(data.x_train.numpy().tobytes()).hexdigest())
"""


def test_two_processes_at_once_decode_once(cifar_trees, tmp_path, own_cache):
    folder = cifar_trees["root"] / "jpeg" / "train"
    env = {**os.environ, "REGSEARCH_CACHE": str(own_cache), "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen([sys.executable, "-c", TWO, str(folder)], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=tmp_path) for _ in range(2)]
    outs = [run.communicate(timeout=120)[0].split() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert sorted(int(o[0]) for o in outs) == [0, 1]  # one decoded, the other waited and read its file
    assert outs[0][1] == outs[1][1]
    assert len(cache_files(own_cache)) == 1


# --------------------------------------------------------------------------------------------------------------
# any map-style Dataset, and streaming from the cache file


class Pictures(torch.utils.data.Dataset):
    """A user's Dataset: PIL images, arrays or tensors, as `kind` says, with integer labels."""

    def __init__(self, paths, labels, kind: str) -> None:
        self.paths, self.labels, self.kind, self.reads = paths, labels, kind, 0
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        self.reads += 1
        image = Image.open(self.paths[i])
        if self.kind == "array":
            image = np.asarray(image)
        elif self.kind == "tensor":
            image = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return image, torch.tensor(self.labels[i])


def test_without_a_size_small_images_keep_theirs_and_photographs_become_64(cifar_trees, tmp_path):
    tests = cifar_trees["root"] / "png" / "test"
    assert load_images(tests).x_train.shape[1:] == (3, 32, 32)  # CIFAR's 32 px: not scaled up
    listing = list_images(tests)
    assert images_from_dataset(Pictures(listing.paths, listing.labels, "tensor")).x_train.shape[1:] == (3, 32, 32)
    for i, (w, h) in enumerate([(300, 200), (120, 100), (90, 160), (40, 30)] * 2):
        write(tmp_path / "photos" / "ab"[i % 2] / f"{i}.jpg", halves(w, h))
    assert load_images(tmp_path / "photos", val_fraction=0.5).x_train.shape[1:] == (3, 64, 64)
    assert images_from_dataset(Four(), val_fraction=0.5).x_train.shape[1:] == (3, 20, 20)


class Four(torch.utils.data.Dataset):
    """Four 20-pixel tensors; reading past the end is an error other than IndexError, as many Datasets' is."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        if not 0 <= i < 4:
            raise RuntimeError(f"item {i} read past the end")
        return torch.full((3, 20, 20), 60 * i, dtype=torch.uint8), i % 2


@pytest.mark.parametrize("kind", ["pil", "array", "tensor"])
def test_a_dataset_goes_through_the_same_cache(cifar_trees, kind):
    listing = list_images(cifar_trees["root"] / "png" / "test")
    dataset = Pictures(listing.paths, listing.labels, kind)
    data = images_from_dataset(dataset, image_size=32, seed=2, cache_key="pictures-v1")
    folder = load_images(listing.where, image_size=32, seed=2)
    assert data.classes == CLASSES and torch.equal(data.x_train, folder.x_train)
    assert torch.equal(data.y_val, folder.y_val) and torch.equal(data.mean, folder.mean)
    reads = dataset.reads
    again = images_from_dataset(dataset, image_size=32, seed=2, cache_key="pictures-v1")
    assert dataset.reads == reads and torch.equal(again.x_val, data.x_val)  # the key reused: not read again
    images_from_dataset(dataset, image_size=32, seed=2)
    assert dataset.reads == 2 * reads  # no key: decoded again


def test_streamed_splits_train_exactly_as_in_memory_ones(cifar_trees):
    from regsearch._spec import TrainingSpec
    from regsearch._trainer import fit
    from regsearch.models import cnn

    folder = cifar_trees["root"] / "png" / "train"
    held = load_images(folder, image_size=32, in_memory=True)
    streamed = load_images(folder, image_size=32, in_memory=False)
    assert isinstance(streamed.x_train, StreamedImages) and isinstance(held.x_train, torch.Tensor)
    assert torch.equal(streamed.x_train[:], held.x_train) and torch.equal(streamed.mean, held.mean)
    training = TrainingSpec(epochs=2, batch_size=32, lr=0.05)
    metrics = []
    for data in (held, streamed):
        torch.manual_seed(0)
        model = cnn((3, 32, 32), 10, channels=[8, 16], hidden=32)
        metrics.append(fit(model, data, [], training, lr=0.05, device=torch.device("cpu"), seed=0,
                           autocast=None))
    assert metrics[0] == metrics[1]


def test_confirmation_folds_of_streamed_splits_hold_the_in_memory_folds_images(cifar_trees):
    from regsearch.data._tensors import cv_folds, fold_split, pool_groups

    folder = cifar_trees["root"] / "png" / "test"
    held = load_images(folder, image_size=32, in_memory=True, group_repeats=True)
    streamed = load_images(folder, image_size=32, in_memory=False, group_repeats=True)
    a, b = pool_groups(streamed), pool_groups(held)  # the same grouping, perhaps numbered otherwise
    assert len(np.unique(np.stack([a, b], 1), axis=0)) == len(np.unique(a)) == len(np.unique(b))
    for train, val in cv_folds(streamed, 3, 0):
        fold, same = fold_split(streamed, train, val), fold_split(held, train, val)
        assert isinstance(fold.x_train, StreamedImages)
        assert torch.equal(fold.x_train[:], same.x_train) and torch.equal(fold.x_val[:], same.x_val)


def test_group_repeats_keeps_byte_identical_files_on_one_side(cifar_trees, tmp_path):
    folder = copy_tree(cifar_trees["root"] / "png" / "test", tmp_path / "photos")
    for i, original in enumerate(sorted((folder / "cat").iterdir())):
        for k in range(3):
            (folder / "cat" / f"copy{k}-{i}.png").write_bytes(original.read_bytes())
    data = load_images(folder, image_size=32, group_repeats=True, seed=0)
    seen = {bytes(row.numpy()) for row in data.x_train}
    assert not any(bytes(row.numpy()) in seen for row in data.x_val)
    plain = load_images(folder, image_size=32, seed=0)
    seen = {bytes(row.numpy()) for row in plain.x_train}
    assert any(bytes(row.numpy()) in seen for row in plain.x_val)  # without it, copies straddle the split


def test_non_image_files_are_skipped_and_counted(cifar_trees, tmp_path, caplog):
    folder = copy_tree(cifar_trees["root"] / "png" / "test", tmp_path / "photos")
    (folder / "cat" / "notes.txt").write_text("not an image")
    (folder / "README.md").write_text("about the photos")
    (folder / "dog" / ".DS_Store").write_bytes(b"\0\1")
    with caplog.at_level(logging.WARNING, logger="regsearch"):
        data = load_images(folder, image_size=32)
    assert "skipped 3 files that are not images" in caplog.text
    assert len(data.y_train) + len(data.y_val) == N_TEST


@pytest.mark.slow
def test_data_dir_names_the_image_folder_of_a_study_that_streams_it(cifar_trees, in_tmp, mlflow_store):
    import shutil

    import regsearch

    shutil.copy(mlflow_store, in_tmp / "m.db")  # migrated once per module
    study = regsearch.optimize("images", n_trials=1, storage="s.journal", tracking_uri=f"sqlite:///{in_tmp}/m.db",
                               data_dir=str(cifar_trees["root"] / "png" / "test"), device="cpu",
                               overrides=[("data.image_size", "16"), ("training.steps", "2"),
                                          ("data.in_memory", "false"), ("search.confirm", "null"),
                                          ("data.test_path", str(cifar_trees["root"] / "jpeg" / "test"))])
    assert study.trials[0].state.name == "COMPLETE"  # the whole study on splits streamed from the cache file
    assert "test_acc" in study.user_attrs["best_test"]


def test_the_shipped_study_file_reads(tmp_path):
    from regsearch._study_file import load_study

    spec = load_study("images", overrides=[("data.path", str(tmp_path))])
    assert spec.data.name == "images" and spec.data.path == str(tmp_path) and spec.model.name == "resnet"
    assert (REPO / "studies" / "images.yaml").is_file()


# --------------------------------------------------------------------------------------------------------------
# failures leave nothing half-written that a later run would use


def test_a_corrupt_image_stops_the_decode_and_leaves_no_cache_file(cifar_trees, tmp_path, own_cache):
    folder = copy_tree(cifar_trees["root"] / "png" / "test", tmp_path / "photos")
    broken = sorted((folder / "dog").iterdir())[1]
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 3])
    with pytest.raises(DataError, match=f"cannot decode image {broken}"):
        load_images(folder, image_size=32)
    assert cache_files(own_cache) == [] and not list((own_cache / "images").glob("*.part"))
    broken.write_bytes(good)
    assert len(load_images(folder, image_size=32).y_train) == 80


def test_a_cache_folder_without_room_is_refused_before_decoding(cifar_trees, tmp_path, monkeypatch):
    from tests.conftest import small_tmpfs

    with small_tmpfs(tmp_path / "small", "200k") as small:
        monkeypatch.setenv("REGSEARCH_CACHE", str(small))
        with pytest.raises(DataError, match=r"the image cache needs 0.3 MB in .*small/images, which has 0.2 MB free"):
            load_images(cifar_trees["root"] / "png" / "test", image_size=32)
        assert not list((small / "images").glob("*.u8")) and not list((small / "images").glob("*.part"))


FILLS = """
import resource, signal, sys
from regsearch.data import images
from regsearch._errors import DataError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    images.load_images(sys.argv[1], image_size=32)
except DataError as exc:
    print(exc)
"""


def test_a_disk_that_fills_while_the_cache_is_written_leaves_nothing_used_later(cifar_trees, tmp_path, own_cache):
    folder = cifar_trees["root"] / "png" / "test"
    env = {**os.environ, "REGSEARCH_CACHE": str(own_cache), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", FILLS, str(folder)], check=False, capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "filled up while writing it" in done.stdout
    assert cache_files(own_cache) == [] and not list((own_cache / "images").glob("*.part"))
    assert len(load_images(folder, image_size=32).y_val) == 20  # with room, the next run decodes and trains
