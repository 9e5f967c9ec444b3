"""GPU check (issue 5, "On a GPU"): the default CIFAR network's training throughput and how busy the GPU is.

Runs where CUDA is available (never in CI). For each dataset — synthetic data of CIFAR-10's shape (50,000
training images) and, with --data, the real CIFAR sample — it trains the cifar study's network with the
study's recipe (augment + BatchNorm on, bf16 autocast, channels_last, data on the GPU) through regsearch's own
`fit`, and records:
- training images/s per epoch (the per-epoch eval-mode metrics are timed and taken out; epoch 1 is warm-up);
- GPU busy: the share of the fit's wall time during which a CUDA kernel ran (torch.profiler, union of kernel
  intervals), and nvidia-smi's utilization samples (every 100 ms) during the timed epochs;
- a whole study (`optimize(..., device="cuda", tracking=False)`, a few trials) on the same data: wall time
  and trials per minute.
The yardstick: airbench-class CIFAR-10 trainers do 50,000 images x 10 epochs in under 4 s on an A100,
i.e. about 125,000 training images/s; the target is within 2x of that (>= 62,500 img/s).

usage: python benchmarks/gpu.py [--data ARCHIVE] [--epochs 5] [--batch-sizes 512,1024] [--trials 4]
       python benchmarks/gpu.py --quick    # tiny sizes, on the CPU where no GPU is: the CI smoke run
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

AIRBENCH_IMG_S = 50_000 * 10 / 4.0
DEVICE = "cuda"


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


class SmiSampler:
    """nvidia-smi utilization samples (percent of time a kernel ran), with their times."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        if DEVICE != "cuda":
            self.proc = None
            return
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "100"], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.perf_counter(), int(line)))

    def between(self, start: float, end: float) -> list[int]:
        return [u for t, u in self.samples if start <= t <= end]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def busy_share(prof, wall_us: float) -> float:
    """The union of CUDA kernel intervals over the profiled wall time."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy / wall_us


def measure(spec, data, epochs: int, smi: SmiSampler) -> dict:
    import optuna

    import regsearch._trainer as trainer
    from regsearch._experiment import prepare
    from regsearch._trial import build_trial

    exp = prepare(spec, data=data, device=DEVICE)
    recipe = dict(spec.search.first_trial)  # the study's known-good recipe (its trial 1)
    model, applied, lr = build_trial(exp, optuna.trial.FixedTrial(recipe), 1)
    eval_s = [0.0]
    evaluate = trainer.evaluate

    def timed_evaluate(*a, **k):
        sync()
        start = time.perf_counter()
        try:
            return evaluate(*a, **k)  # ends with .item(): synchronised
        finally:
            eval_s[0] += time.perf_counter() - start

    trainer.evaluate = timed_evaluate
    marks = [(time.perf_counter(), 0.0)]
    try:
        trainer.fit(model, exp.data, applied, spec.training, lr=lr, device=exp.device, seed=1, epochs=epochs,
                    on_epoch=lambda epoch, m: marks.append((time.perf_counter(), eval_s[0])))
        # one more short fit under the profiler: how much of the wall time a kernel was running
        model, applied, lr = build_trial(exp, optuna.trial.FixedTrial(recipe), 2)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            trainer.fit(model, exp.data, applied, spec.training, lr=lr, device=exp.device, seed=2, epochs=2)
            sync()
            wall_us = (time.perf_counter() - start) * 1e6
        busy = busy_share(prof, wall_us)
        host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)
    finally:
        trainer.evaluate = evaluate
    n = len(exp.data.y_train)
    rates = [n / ((t1 - t0) - (e1 - e0)) for (t0, e0), (t1, e1) in zip(marks, marks[1:])]
    util = smi.between(marks[1][0], marks[-1][0])
    return {"images": n, "img_per_s": rates, "img_per_s_median": statistics.median(rates[1:] or rates),
            "epoch_s": [t1 - t0 for (t0, _), (t1, _) in zip(marks, marks[1:])],
            "profiler_busy_share": busy, "smi_util_median": statistics.median(util) if util else None,
            "smi_util_min": min(util) if util else None, "smi_samples": len(util), "host_profile": host}


def study(spec, data, trials: int) -> dict:
    import optuna

    from regsearch._study import optimize

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = optimize(spec, data=data, n_trials=trials, device=DEVICE, tracking=False,
                          storage=f"{tmp}/gpu.journal")
        wall = time.perf_counter() - start
        done = result.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                         optuna.trial.TrialState.PRUNED))
        test = result.user_attrs.get("best_test", {})
        best = result.best_value
        summary = result.user_attrs.get("summary")
    return {"trials": len(done), "wall_s": wall, "trials_per_min": 60 * len(done) / wall,
            "best_val_acc": best, "best_test_acc": test.get("test_acc"), "summary": summary}


def main() -> None:
    ap = common.parser(__doc__, "gpu")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-sizes", default="", help="also train the synthetic set at these batch sizes (e.g. 512,1024)")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--synthetic", type=int, default=50_000, help="synthetic training images")
    a = ap.parse_args()

    import torch

    global DEVICE
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    if DEVICE != "cuda" and not a.quick:
        sys.exit("no CUDA device here: this benchmark is for a GPU machine (--quick checks the script on a CPU)")
    if a.quick:
        a.synthetic, a.epochs, a.trials, a.batch_sizes = 256, 2, 2, ""
    if not Path(a.data).is_file() or a.quick:
        a.data = None

    import optuna

    from regsearch._study_file import load_study
    from regsearch.data._tensors import TensorData, load_dataset

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_study("cifar")
    gen = torch.Generator().manual_seed(0)
    n = round(a.synthetic / (1 - spec.data.val_fraction))
    synthetic = TensorData.from_arrays(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.randint(0, 10, (n,), generator=gen),
        torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.randint(0, 10, (1000,), generator=gen), val_fraction=0.1, num_classes=10, name="synthetic")
    sets = {f"synthetic {a.synthetic}": synthetic}
    if a.data:
        sets["CIFAR sample"] = load_dataset("cifar10", val_fraction=spec.data.val_fraction, seed=spec.seed,
                                            data_dir=a.data)
    smi = SmiSampler()
    out = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else common.machine(), "quick": a.quick,
           "torch": torch.__version__, "batch_size": spec.training.batch_size, "epochs": a.epochs,
           "airbench_img_per_s": AIRBENCH_IMG_S, "date": common.DATE, "runs": {}}
    try:
        for name, data in sets.items():
            out["runs"][name] = {"train": measure(spec, data, a.epochs, smi)}
            print(name, json.dumps(out["runs"][name]["train"]), flush=True)
        for bs in [int(b) for b in a.batch_sizes.split(",") if b]:
            name = f"{next(iter(sets))}, batch {bs}"
            bigger = load_study("cifar", [("training.batch_size", str(bs))])
            out["runs"][name] = {"train": measure(bigger, synthetic, a.epochs, smi)}
            print(name, json.dumps(out["runs"][name]["train"]), flush=True)
        if a.data:
            out["runs"]["CIFAR sample"]["study"] = study(spec, sets["CIFAR sample"], a.trials)
            print("study", json.dumps(out["runs"]["CIFAR sample"]["study"]), flush=True)
    finally:
        smi.close()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    for name, run in out["runs"].items():
        print(f"--- host time, {name} ---\n{run['train'].pop('host_profile')}")
    # epoch 1 is warm-up
    out["measures"] = {name: common.summary(run["train"]["img_per_s"][1:]) for name, run in out["runs"].items()}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"{'data':<28} {'median img/s':>12} {'x airbench':>10} {'busy':>6} {'smi util':>8}")
    for name, run in out["runs"].items():
        t = run["train"]
        print(f"{name:<28} {t['img_per_s_median']:>12.0f} {t['img_per_s_median'] / AIRBENCH_IMG_S:>10.2f} "
              f"{t['profiler_busy_share']:>6.0%} {t['smi_util_median'] if t['smi_util_median'] is not None else '-':>8}")


if __name__ == "__main__":
    main()
