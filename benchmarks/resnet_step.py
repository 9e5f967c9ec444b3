"""What a resnet18 training step and trial cost on this CPU: 32-px images, batch 128, float32, regsearch's trainer.

Each side runs in a fresh child process, alternating: resnet18 (width 64, the published network with the small
stem), the same with `drop_path` at rate 0.2, and resnet18 at width 32 (`--quick`: width 8 with drop_path). A step's time counts training only (the
per-epoch eval-mode metrics are timed and taken out); the first epoch of each run is warm-up and is left out. The
ceiling is the machine's sgemm rate (measured in the same run) / FLOPs per training image (forward + backward,
torch.utils.flop_counter). A trial's time is the step time times the steps of one epoch of the CIFAR sample's
training split (4,000 images), times the epochs.

usage: python benchmarks/resnet_step.py [--repeats 2] [--steps 5] [--quick]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

BATCH = 128
SAMPLE_TRAIN = 4000
"""The CIFAR sample's training split (5,000 images less the cifar study's validation fifth)."""
SIDES = {"resnet18": (64, None), "resnet18+drop_path": (64, 0.2), "resnet18 width 32": (32, None)}


def child_step(folder: str, width: int, drop_path: float | None, steps: int) -> dict:
    import torch

    import regsearch._trainer as trainer

    regularizers = f"{{drop_path: {{enabled: true, rate: {drop_path}}}}}" if drop_path else "{}"
    overrides = [("training.epochs", "2"), ("regularizers", regularizers), ("model", f"{{name: resnet18, width: "
                 f"{width}}}"), ("training.batch_size", str(BATCH)), ("training.precision", "float32"),
                 ("data.train_size", str(BATCH * steps)), ("data.val_fraction", "0.05")]
    exp, model, seconds = common.train_cifar_timed(folder, overrides)
    n_steps = trainer.steps_per_epoch(len(exp.data.y_train), BATCH)
    per_step = [s / n_steps for s in seconds]
    return {"s_per_step": per_step, "steps_per_epoch": n_steps, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters())}


def child_ceiling(quick: bool, width: int) -> dict:
    import torch

    from regsearch.models import resnet18

    gflops = common.sgemm_gflops(quick)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    per_image = common.training_flops_per_sample(resnet18((3, 32, 32), 10, width=width), x, y) / 1e9
    return {"sgemm_gflops": gflops, "gflop_per_image": per_image, "ceiling_s_per_step": BATCH * per_image / gflops}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "step":
            out = child_step(rest[0], int(rest[1]), float(rest[2]) or None, int(rest[3]))
        else:
            out = child_ceiling(rest[0] == "quick", int(rest[1]))
        print(json.dumps(out))
        return
    ap = common.parser(__doc__, "resnet_step")
    ap.set_defaults(repeats=2)
    ap.add_argument("--steps", type=int, default=5, help="steps per epoch (two epochs a run; the first is warm-up)")
    ap.add_argument("--epochs", type=int, default=30, help="a trial's epochs, for its estimated time")
    a = ap.parse_args()
    steps = 1 if a.quick else a.steps
    repeats = 1 if a.quick else a.repeats
    me = [sys.executable, __file__, "--child"]
    sides = {"resnet18 width 8+drop_path": (8, 0.2)} if a.quick else SIDES  # quick: that the script runs
    with common.temp_dir() as tmp:
        folder, what = common.cifar_folder(a.data, Path(tmp), a.quick)
        runs = common.alternate({name: (lambda w=w, r=r: common.run_json(
            [*me, "step", str(folder), str(w), str(r or 0), str(steps)])) for name, (w, r) in sides.items()}, repeats)
    ceilings = {name: common.run_json([*me, "ceiling", "quick" if a.quick else "full", str(w)])
                for name, (w, _) in sides.items() if "drop_path" not in name}
    step = {name: common.summary([statistics.median(r["s_per_step"][1:]) for r in runs[name]]) for name in sides}
    per_epoch = -(-SAMPLE_TRAIN // BATCH)
    extra = {"data": what, "batch": BATCH, "threads": runs[next(iter(sides))][0]["threads"],
             **{f"{name} gflop_per_training_image": c["gflop_per_image"] for name, c in ceilings.items()},
             **{f"{name} params": runs[name][0]["params"] for name in sides},
             **{f"{name} trial_s ({a.epochs} epochs of {SAMPLE_TRAIN} images)":
                step[name]["median"] * per_epoch * a.epochs for name in sides},
             "runs": runs, "ceilings": ceilings}
    rows = [(f"{name} step (batch {BATCH}, 32 px, float32)", step[name], "s") for name in sides]
    rows += [(f"{name} ceiling step (sgemm / FLOPs)", common.summary([c["ceiling_s_per_step"]]), "s")
             for name, c in ceilings.items()]
    rows.append(("sgemm", common.summary([c["sgemm_gflops"] for c in ceilings.values()]), "GFLOP/s"))
    common.report("resnet_step", a, rows, extra)


if __name__ == "__main__":
    main()
