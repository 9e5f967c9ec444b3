"""Images streamed from the cache file against images held in memory: private memory and epoch time.

The folder holds the shared CIFAR-10 sample's training images, each written at 64×64 in several variants (flipped,
shifted, brightened: not byte-identical), in class subfolders. It is decoded once into the cache; then child
processes, alternating, load it held in memory (`in_memory=True`) or streamed (`in_memory=False`) and train one
epoch of the trainer's `fit` with a linear model (so that the data path, not the network, is what is timed).
Private memory is the child's `RssAnon` after the epoch (pages of the memory-mapped cache file are the page
cache's, shared, and not counted). The 2 cores are shared with other work: read the ratios.

usage: python benchmarks/images_streaming.py [--images 20000] [--repeats 2] [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from images_pipeline import rss_anon_mb  # noqa: E402

SIZE = 64


def child(folder: str, cache: str, in_memory: bool) -> dict:
    os.environ["REGSEARCH_CACHE"] = cache
    import torch

    from regsearch._spec import TrainingSpec
    from regsearch._trainer import fit
    from regsearch.data.images import load_images

    start = time.perf_counter()
    data = load_images(folder, image_size=SIZE, val_fraction=0.05, in_memory=in_memory)
    load = time.perf_counter() - start
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 10))
    stamps = [time.perf_counter()]
    fit(model, data, [], TrainingSpec(epochs=1, batch_size=256, lr=0.01, schedule="constant", precision="float32"),
        lr=0.01, device=torch.device("cpu"), seed=0, on_epoch=lambda *_: stamps.append(time.perf_counter()))
    return {"n": len(data.y_train), "load_s": load, "epoch_s": stamps[1] - stamps[0], "rss_anon_mb": rss_anon_mb(),
            "pixels_mb": (len(data.y_train) + len(data.y_val)) * 3 * SIZE * SIZE / 1e6}


def write_folder(archive: str, folder: Path, images: int) -> str:
    import numpy as np
    from PIL import Image, ImageEnhance, ImageOps

    from regsearch.data.cifar import load_cifar10

    if Path(archive).is_file():
        x, y, _, _ = load_cifar10(archive)
    else:  # synthetic pixels of CIFAR's shape where the sample is absent (CI)
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (1000, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 1000)
    for i in range(images):
        k, v = i % len(y), i // len(y)
        image = Image.fromarray(np.ascontiguousarray(x[k].transpose(1, 2, 0))).resize((SIZE, SIZE))
        image = ImageOps.mirror(image) if v % 2 else image
        image = ImageEnhance.Brightness(image).enhance(1 + 0.05 * v)
        (folder / str(y[k])).mkdir(parents=True, exist_ok=True)
        image.save(folder / str(y[k]) / f"{i:06d}.png", compress_level=1)
    return f"{images} PNGs at {SIZE}x{SIZE}: the CIFAR-10 sample's training images, flipped and brightened variants"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[3], sys.argv[4], sys.argv[2] == "memory")))
        return
    ap = common.parser(__doc__, "images_streaming")
    ap.set_defaults(repeats=2)
    ap.add_argument("--images", type=int, default=20_000)
    a = ap.parse_args()
    images, repeats = (500, 1) if a.quick else (a.images, a.repeats)
    me = [sys.executable, __file__, "--child"]
    with common.temp_dir() as tmp:
        folder, cache = Path(tmp) / "photos", str(Path(tmp) / "cache")
        what = write_folder(a.data, folder, images)
        first = common.run_json([*me, "streamed", str(folder), cache], timeout=3600)  # the one decode
        runs = common.alternate({kind: (lambda kind=kind: common.run_json([*me, kind, str(folder), cache],
                                                                           timeout=3600))
                                 for kind in ("memory", "streamed")}, repeats)
    rows = [(f"{kind} epoch", common.summary([r["n"] / r["epoch_s"] for r in runs[kind]]), "img/s")
            for kind in runs]
    rows += [(f"{kind} RssAnon", common.summary([r["rss_anon_mb"] for r in runs[kind]]), "MB") for kind in runs]
    extra = {"data": what, "pixels_mb": first["pixels_mb"], "first_load_with_decode_s": first["load_s"],
             "streamed_epoch_time_ratio": common.ratio(rows[0][1], rows[1][1]),
             "note": "2 cores; the load average at start is in the header; read the ratios", "runs": runs}
    common.report("images_streaming", a, rows, extra)


if __name__ == "__main__":
    main()
