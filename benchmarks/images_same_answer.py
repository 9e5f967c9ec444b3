"""Same images, same answer: the `cifar` study on the CIFAR-10 sample read from its binary files and written out
as a PNG folder tree (and as JPEG), seed by seed: test accuracy and the trial's time.

Each side runs the study's first trial (the unregularized baseline, the study's 12 epochs) in a child process,
alternating sides per seed; the folder sides read the cache decoded before the first of them (the decode is
timed apart). The 2 cores are shared with other work: compare the sides' times, not the times to other days.

usage: python benchmarks/images_same_answer.py [--seeds 3] [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

DECODE = ("import json, os, sys; os.environ['REGSEARCH_CACHE'] = sys.argv[2]; "
          "from regsearch.data.images import load_images; "
          "load_images(sys.argv[1] + '/train', test_path=sys.argv[1] + '/test', image_size=32); print(json.dumps({}))")
"""A child process that decodes a tree's train and test folders into the cache."""
NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def child(kind: str, source: str, seed: int, cache: str, quick: bool) -> dict:
    os.environ["REGSEARCH_CACHE"] = cache
    import regsearch

    overrides = [("seed", str(seed))] + ([("training.epochs", "1"), ("data.train_size", "400")] if quick else [])
    if kind != "binary":
        overrides += [("data.name", "images"), ("data.path", f"{source}/train"), ("data.test_path", f"{source}/test"),
                      ("data.image_size", "32")]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        study = regsearch.optimize("cifar", n_trials=1, storage=f"{tmp}/s.journal", device="cpu",
                                   tracking=not quick,  # the smoke run checks the data paths, not MLflow
                                   tracking_uri=f"sqlite:///{tmp}/m.db", data_dir=source if kind == "binary" else None,
                                   overrides=overrides)
        trial = study.trials[0]
        return {"test_acc": study.user_attrs["best_test"]["test_acc"], "val_acc": trial.value,
                "trial_s": trial.duration.total_seconds(), "process_s": time.perf_counter() - start}


def write_trees(archive: str, root: Path, quick: bool) -> None:
    from PIL import Image

    from regsearch.data.cifar import load_cifar10

    x_train, y_train, x_test, y_test = load_cifar10(archive)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        for i in range(400 if quick else len(y)):
            image = Image.fromarray(x[i].transpose(1, 2, 0))
            for fmt, ext, options in (("png", "png", {}), ("jpeg", "jpg", {"quality": 95})):
                folder = root / fmt / split / NAMES[y[i]]
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{i:05d}.{ext}", **options)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, source, seed, cache, quick = sys.argv[2:7]
        print(json.dumps(child(kind, source, int(seed), cache, quick == "1")))
        return
    ap = common.parser(__doc__, "images_same_answer")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    seeds = 1 if a.quick else a.seeds
    me = [sys.executable, __file__, "--child"]
    with common.temp_dir() as tmp:
        root, cache = Path(tmp) / "trees", str(Path(tmp) / "cache")
        write_trees(a.data, root, a.quick)
        decode = {}
        for fmt in ("png", "jpeg"):
            start = time.perf_counter()
            common.run_json([sys.executable, "-c", DECODE, str(root / fmt), cache])
            decode[fmt] = time.perf_counter() - start
        sources = {"binary": a.data, "png": str(root / "png"), "jpeg": str(root / "jpeg")}
        runs: dict[str, list[dict]] = {kind: [] for kind in sources}
        for seed in range(seeds):
            for kind, source in sources.items():
                runs[kind].append(common.run_json([*me, kind, source, str(seed), cache, "1" if a.quick else "0"]))
    rows = [(f"{kind} test accuracy", common.summary([r["test_acc"] for r in runs[kind]]), "") for kind in runs]
    rows += [(f"{kind} trial time", common.summary([r["trial_s"] for r in runs[kind]]), "s") for kind in runs]
    extra = {"decode_process_s": decode, "png_trial_time_ratio": common.ratio(rows[4][1], rows[3][1]),
             "jpeg_trial_time_ratio": common.ratio(rows[5][1], rows[3][1]),
             "note": "2 cores; the load average at start is in the header", "runs": runs}
    common.report("images_same_answer", a, rows, extra)


if __name__ == "__main__":
    main()
