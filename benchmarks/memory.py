"""Target 6: peak RSS of a worker training on 50,000 CIFAR-sized images (CPU).

The images are synthetic uint8 of CIFAR-10's shape written in the official binary layout (the shared sample
holds only 5,000), so the loader, the split and one trial of one epoch run exactly as on the real set.
regsearch runs `regsearch.optimize("cifar", ...)` with MLflow tracking on, as a worker does; the peer runs its
own script (one trial, one epoch) on the same folder. Peak RSS is the child's `ru_maxrss`; for the peer also
the largest of its DataLoader worker processes.

usage: python benchmarks/memory.py [--images 50000] [--repeats 1] [--quick]
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def peak_mb() -> dict:
    return {"self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def child_regsearch(folder: str) -> dict:
    import regsearch

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        regsearch.optimize("cifar", data_dir=folder, n_trials=1, storage=f"{tmp}/s.journal", device="cpu",
                           tracking_uri=f"sqlite:///{tmp}/mlflow.db", overrides=[("training.epochs", "1")])
        return {**peak_mb(), "train_s": time.perf_counter() - start}


def child_peer(peer: str, folder: str) -> dict:
    sys.argv = [peer, "--data", "cifar", "--data-dir", folder, "--n-trials", "1", "--epochs", "1"]
    start = time.perf_counter()
    runpy.run_path(peer, run_name="__main__")
    return {**peak_mb(), "train_s": time.perf_counter() - start}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        out = child_regsearch(sys.argv[3]) if sys.argv[2] == "regsearch" else child_peer(sys.argv[3], sys.argv[4])
        print(json.dumps(out))
        return
    ap = common.parser(__doc__, "memory")
    ap.set_defaults(repeats=1)
    ap.add_argument("--images", type=int, default=50_000)
    a = ap.parse_args()
    images = 600 if a.quick else a.images
    repeats = 1 if a.quick else a.repeats
    me = [sys.executable, __file__, "--child"]
    with common.temp_dir() as tmp:
        folder = common.write_synthetic_cifar(Path(tmp) / "cifar", images, 10_000 if not a.quick else 200)
        sides = {"regsearch": lambda: common.run_json([*me, "regsearch", str(folder)])}
        if Path(a.peer).is_file():
            sides["peer"] = lambda: common.run_json([*me, "peer", a.peer, str(folder)])
        runs = common.alternate(sides, repeats)
    rows = [("regsearch worker peak RSS", common.summary([r["self_mb"] for r in runs["regsearch"]]), "MB")]
    if "peer" in runs:
        rows += [("peer main process peak RSS", common.summary([r["self_mb"] for r in runs["peer"]]), "MB"),
                 ("peer largest DataLoader worker peak RSS",
                  common.summary([r["children_mb"] for r in runs["peer"]]), "MB")]
    rows.append(("regsearch one trial, one epoch (wall)",
                 common.summary([r["train_s"] for r in runs["regsearch"]]), "s"))
    common.report("memory", a, rows, {"images": images, "data": "synthetic uint8 of CIFAR-10's shape",
                                      "runs": runs})


if __name__ == "__main__":
    main()
