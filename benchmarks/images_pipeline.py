"""An image folder: regsearch's decode-once cache against the usual per-sample pipeline, images per second.

The folder is the shared CIFAR-10 sample's training images written as PNG files in class subfolders. Both sides
train the same network (the built-in 3-stage CNN) with the same optimizer, batch size and augmentation (random
flip, shift/crop of up to 4 pixels, normalisation):

- regsearch: `load_images` (the first run decodes the folder into the cache, in parallel processes), then the
  trainer's own `fit` with the `augment` regularizer: each step indexes a batch of uint8 images, normalises it
  and flips and shifts it as one tensor (channels-last, as every trial); once more with the splits streamed from
  the cache file (`in_memory=False`). Its epochs include the trainer's per-epoch evaluation on 1 % of the images.
- the peer: what torchvision's `ImageFolder` + transforms do, written here: a map-style Dataset that opens each
  file with PIL, flips, pads-and-crops and normalises one sample at a time, in a `DataLoader(num_workers=2)`.

First epoch: for regsearch the decode and the epoch together; later epochs: the second epoch. Each side runs in a
child process, alternating. The machine's 2 cores are shared with other work: read ratios, not absolute times.

usage: python benchmarks/images_pipeline.py [--images 5000] [--repeats 2] [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

BATCH = 128
PAD = 4


def network():
    import torch

    from regsearch.models import cnn

    torch.manual_seed(0)
    model = cnn((3, 32, 32), 10)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def step(model, optimizer, x, y) -> None:
    import torch.nn.functional as F

    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def child_regsearch(folder: str, cache: str, in_memory: bool) -> dict:
    os.environ["REGSEARCH_CACHE"] = cache
    import torch

    from regsearch._regularizer import Applied
    from regsearch._spec import TrainingSpec
    from regsearch._trainer import fit
    from regsearch.data.images import load_images
    from regsearch.regularizers.augment import Augment

    start = time.perf_counter()
    data = load_images(folder, image_size=32, val_fraction=0.01, in_memory=in_memory)
    decode = time.perf_counter() - start
    model, _ = network()
    stamps = [time.perf_counter()]
    training = TrainingSpec(epochs=2, batch_size=BATCH, lr=0.05, schedule="constant", precision="float32")
    fit(model, data, [Applied(Augment(translate=PAD), {"translate": PAD})], training, lr=0.05,
        device=torch.device("cpu"), seed=0, on_epoch=lambda *_: stamps.append(time.perf_counter()))
    epochs = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"n": len(data.y_train), "decode_s": decode, "epoch_s": epochs, "rss_anon_mb": rss_anon_mb()}


def rss_anon_mb() -> float | None:
    """The process's private resident memory (the page cache of a memory-mapped file not counted)."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def child_peer(folder: str) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    classes = sorted(d for d in os.listdir(folder) if not d.startswith("."))
    samples = [(os.path.join(folder, c, f), i) for i, c in enumerate(classes)
               for f in sorted(os.listdir(os.path.join(folder, c)))]
    mean = torch.tensor([0.49, 0.48, 0.45]).view(3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26]).view(3, 1, 1)

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            path, label = samples[i]
            with Image.open(path) as image:
                x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
            if torch.rand(()) < 0.5:
                x = x.flip(2)
            padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
            dy, dx = torch.randint(0, 2 * PAD + 1, (2,)).tolist()
            x = padded[:, dy:dy + 32, dx:dx + 32]
            return (x.float() / 255 - mean) / std, label

    loader = torch.utils.data.DataLoader(Folder(), batch_size=BATCH, shuffle=True, num_workers=2, drop_last=True)
    model, optimizer = network()
    epochs = []
    for _ in range(2):
        began = time.perf_counter()
        for x, y in loader:
            step(model, optimizer, x, y)
        epochs.append(time.perf_counter() - began)
    return {"n": len(samples), "decode_s": 0.0, "epoch_s": epochs}


def write_folder(archive: str, folder: Path, images: int) -> str:
    """The sample's first `images` training images as PNG class folders (synthetic ones without the sample)."""
    from PIL import Image

    from regsearch.data.cifar import load_cifar10

    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    if Path(archive).is_file():
        x, y, _, _ = load_cifar10(archive)
        what = f"the real CIFAR-10 sample's first {images} training images as PNG"
    else:
        import numpy as np

        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, images)
        what = f"{images} synthetic images as PNG"
    for i in range(min(images, len(y))):
        (folder / names[y[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].transpose(1, 2, 0)).save(folder / names[y[i]] / f"{i:05d}.png")
    return what


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind = sys.argv[2]
        out = child_peer(sys.argv[3]) if kind == "peer" else child_regsearch(sys.argv[3], sys.argv[4],
                                                                             kind == "regsearch")
        print(json.dumps(out))
        return
    ap = common.parser(__doc__, "images_pipeline")
    ap.set_defaults(repeats=2)
    ap.add_argument("--images", type=int, default=5000)
    a = ap.parse_args()
    images, repeats = (400, 1) if a.quick else (a.images, a.repeats)
    me = [sys.executable, __file__, "--child"]
    with common.temp_dir() as tmp:
        folder = Path(tmp) / "photos"
        what = write_folder(a.data, folder, images)
        runs: dict[str, list[dict]] = {"regsearch": [], "streamed": [], "peer": []}
        for r in range(repeats):
            for kind in runs:  # a fresh cache per regsearch run: its first epoch includes the decode
                cache = str(Path(tmp) / f"cache-{kind}-{r}")
                runs[kind].append(common.run_json([*me, kind, str(folder), cache], timeout=1800))

    def first(run: dict) -> float:
        return run["n"] / (run["decode_s"] + run["epoch_s"][0])

    def later(run: dict) -> float:
        return run["n"] / run["epoch_s"][1]

    def decode(run: dict) -> float:
        return run["n"] / run["decode_s"]

    stats = {f"{kind} {label}": common.summary([f(run) for run in runs[kind]])
             for kind in runs for label, f in (("first epoch", first), ("later epoch", later))}
    stats["regsearch decode only"] = common.summary([decode(run) for run in runs["regsearch"]])
    rows = [(label, s, "img/s") for label, s in stats.items()]
    extra = {"data": what, "network": "regsearch.models.cnn (32-64-128, hidden 256), SGD, batch 128",
             "first_epoch_ratio": common.ratio(stats["regsearch first epoch"], stats["peer first epoch"]),
             "later_epoch_ratio": common.ratio(stats["regsearch later epoch"], stats["peer later epoch"]),
             "streamed_later_epoch_ratio": common.ratio(stats["streamed later epoch"],
                                                        stats["regsearch later epoch"]),
             "rss_anon_mb": {kind: [run.get("rss_anon_mb") for run in runs[kind]]
                             for kind in ("regsearch", "streamed")},
             "note": "2 shared cores: other engineers' work ran at the same time; sides alternate, read the ratios",
             "runs": runs}
    common.report("images_pipeline", a, rows, extra)


if __name__ == "__main__":
    main()
