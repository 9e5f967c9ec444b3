"""Target 1: CIFAR training throughput (img/s) of regsearch's trainer vs the peer's DataLoader loop.

Both train the peer's CNN (`cnn` in the peer script: 3 conv stages 32/64/128 + Linear 256, batch 128, random
flip + translate by 4) on the same images, each in a fresh child process, alternating. regsearch runs twice:
with its default precision (`training.precision: auto`: bfloat16 autocast on a CPU with native bf16, else
float32) and pinned to float32, as the peer is. An epoch's rate counts training only (regsearch's per-epoch
eval-mode metrics are timed and taken out); the first epoch of each run is warm-up and is left out. The ceiling
is the matrix-multiply rate in the precision trained in (GFLOP/s, measured in the same run) / FLOPs per
training image (forward + backward, counted by torch.utils.flop_counter).

usage: python benchmarks/cifar_throughput.py [--repeats 3] [--epochs 3] [--quick]
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

BATCH = 128


def child_regsearch(folder: str, epochs: int, train_size: int, precision: str) -> dict:
    from regsearch._device import precision_name, training_autocast

    overrides = [("training.epochs", str(epochs)), ("regularizers", "{augment: {enabled: true}}"),
                 ("model.name", "cnn"), ("model.channels", "[32, 64, 128]"), ("model.hidden", "256"),
                 ("training.batch_size", str(BATCH)), ("training.precision", precision),
                 ("data.train_size", str(train_size) if train_size else "null")]
    exp, model, seconds = common.train_cifar_timed(folder, overrides)
    n = len(exp.data.y_train)
    per_epoch = [n / s for s in seconds]
    import torch

    return {"img_per_s": per_epoch, "threads": torch.get_num_threads(), "images": n,
            "precision": precision_name(training_autocast(exp.spec.training, exp.device, model, exp.data))}


def child_peer(peer: str, folder: str, epochs: int, train_size: int) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    spec = importlib.util.spec_from_file_location("peer", peer)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    np.random.seed(0)
    xtr, ytr, _, _ = mod.load_cifar(folder)
    if train_size:
        xtr, ytr = xtr[:train_size], ytr[:train_size]
    n_val = int(len(ytr) * 0.1)
    tr = np.random.RandomState(0).permutation(len(ytr))[n_val:]
    train_set = mod.CifarSet(xtr[tr], ytr[tr], augment=True)
    # exactly the peer's objective: its CNN, SGD with momentum, a DataLoader with 2 persistent workers
    model = mod.cnn(0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(train_set, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        rates.append(len(train_set) / (time.perf_counter() - start))
    return {"img_per_s": rates, "threads": torch.get_num_threads(), "images": len(train_set)}


def child_ceiling(quick: bool) -> dict:
    import torch

    from regsearch._device import native_bf16
    from regsearch.models import cnn

    gflops = common.sgemm_gflops(quick)
    bf16 = common.sgemm_gflops(quick, "bfloat16") if native_bf16(torch.device("cpu")) else None
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    per_image = common.training_flops_per_sample(cnn((3, 32, 32), 10), x, y) / 1e9
    return {"sgemm_gflops": gflops, "bf16_gemm_gflops": bf16, "gflop_per_image": per_image,
            "ceiling_img_per_s": gflops / per_image, "bf16_ceiling_img_per_s": bf16 and bf16 / per_image,
            "threads": torch.get_num_threads()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "regsearch":
            out = child_regsearch(rest[0], int(rest[1]), int(rest[2]), rest[3])
        elif kind == "peer":
            out = child_peer(rest[0], rest[1], int(rest[2]), int(rest[3]))
        else:
            out = child_ceiling(rest[0] == "quick")
        print(json.dumps(out))
        return
    ap = common.parser(__doc__, "cifar_throughput")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    a = ap.parse_args()
    epochs = 2 if a.quick else a.epochs
    repeats = 1 if a.quick else a.repeats
    train_size = 0
    me = [sys.executable, __file__, "--child"]
    with common.temp_dir() as tmp:
        folder, what = common.cifar_folder(a.data, Path(tmp), a.quick)
        sides = {side: (lambda precision=precision: common.run_json(
                     [*me, "regsearch", str(folder), str(epochs), str(train_size), precision]))
                 for side, precision in (("regsearch", "auto"), ("regsearch_fp32", "float32"))}
        sides["ceiling"] = lambda: common.run_json([*me, "ceiling", "quick" if a.quick else "full"])
        if Path(a.peer).is_file():
            sides["peer"] = lambda: common.run_json([*me, "peer", a.peer, str(folder), str(epochs), str(train_size)])
        runs = common.alternate(sides, repeats)
    # per run, the median of its epochs after the first
    rate = {k: common.summary([statistics.median(r["img_per_s"][1:]) for r in runs[k]])
            for k in ("regsearch", "regsearch_fp32", "peer") if k in runs}
    ceilings = runs["ceiling"]
    ceiling = common.summary([r["ceiling_img_per_s"] for r in ceilings])
    bf16_ceiling = common.summary([r["bf16_ceiling_img_per_s"] for r in ceilings if r["bf16_ceiling_img_per_s"]])
    precision = runs["regsearch"][0]["precision"]
    rs, fp32 = rate["regsearch"], rate["regsearch_fp32"]
    extra = {
        "data": what,
        "gflop_per_training_image": ceilings[0]["gflop_per_image"],
        "regsearch_threads": runs["regsearch"][0]["threads"],
        "regsearch_precision": precision,
        "speedup_vs_peer": common.ratio(rs, rate.get("peer")),
        "fp32_speedup_vs_peer": common.ratio(fp32, rate.get("peer")),
        "fraction_of_ceiling": common.ratio(rs, bf16_ceiling if precision == "bfloat16" else ceiling),
        "fp32_fraction_of_ceiling": common.ratio(fp32, ceiling),
        "runs": runs,
    }
    common.report("cifar_throughput", a, [
        (f"regsearch training ({precision})", rs, "img/s"),
        ("regsearch training (float32)", fp32, "img/s"),
        ("peer training (DataLoader, 2 workers)", rate.get("peer"), "img/s"),
        ("sgemm", common.summary([r["sgemm_gflops"] for r in ceilings]), "GFLOP/s"),
        ("bf16 gemm", common.summary([r["bf16_gemm_gflops"] for r in ceilings if r["bf16_gemm_gflops"]]), "GFLOP/s"),
        ("ceiling (sgemm / FLOPs per image)", ceiling, "img/s"),
        ("bf16 ceiling (bf16 gemm / FLOPs per image)", bf16_ceiling, "img/s"),
    ], extra)


if __name__ == "__main__":
    main()
