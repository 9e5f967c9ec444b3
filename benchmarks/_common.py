"""What every benchmark script shares: the peer, the CIFAR data, child processes, medians, the table, the JSON.

Absolute times on a shared 2-core machine move by 4x with other work, so every script runs regsearch and the
peer in child processes of the same script, alternating (A B A B ...), and reports medians and the ratio of
medians measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PEER = REPO.parent / "shared" / "bench" / "peer_optuna_mlflow.py"
CIFAR_SAMPLE = REPO.parent / "shared" / "datasets" / "cifar-10-sample-binary.tar.gz"
DATE = time.strftime("%Y-%m-%d")


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every script takes: --quick, --repeats, --out, --peer, --data."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: the CI smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side (alternating)")
    ap.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="where the JSON goes")
    ap.add_argument("--peer", default=str(PEER), help="the hand-written peer script (skipped where absent)")
    ap.add_argument("--data", default=str(CIFAR_SAMPLE),
                    help="the CIFAR-10 sample archive (synthetic data of CIFAR's shape where absent)")
    return ap


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"python {platform.python_version()}, load average at start {load:.2f}")


def summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": list(values)}


def ratio(a: dict | None, b: dict | None) -> float | None:
    """median(a) / median(b), or None when a side is missing."""
    if not a or not b or not b["median"]:
        return None
    return a["median"] / b["median"]


def sgemm_gflops(quick: bool, dtype: str = "float32") -> float:
    """This machine's matrix-multiply rate now, on torch's default threads (median of a few 2048^3); float32
    (sgemm) unless `dtype` says bfloat16."""
    import torch

    size = 512 if quick else 2048
    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
    times = []
    for _ in range(3 if quick else 7):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[1:]) / 1e9


def training_flops_per_sample(model: Any, x: Any, y: Any) -> float:
    """FLOPs of one training step's forward and backward (cross-entropy) per sample, by torch's flop counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / len(x)


def alternate(sides: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run each side `repeats` times, interleaved (A B A B ...) so slow spells of the machine hit both."""
    out: dict[str, list[Any]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            out[name].append(run())
    return out


def run_json(cmd: Sequence[str], *, cwd: str | Path | None = None, env: dict | None = None,
             timeout: float | None = None) -> dict:
    """Run a child process whose last stdout line is JSON; return it (with `wall_s` of the whole process)."""
    start = time.perf_counter()
    done = subprocess.run(list(cmd), cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stderr[-3000:]}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(map(str, cmd))} printed no JSON line:\n{done.stdout[-2000:]}")
    result = json.loads(lines[-1])
    result.setdefault("process_wall_s", wall)
    return result


def regsearch_exe() -> str:
    return str(Path(sys.executable).parent / "regsearch")


def write_synthetic_cifar(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random uint8 images in the official binary layout (for CI and for sizes the sample does not have)."""
    bins = folder / "cifar-10-batches-bin"
    bins.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-n_train // 5)
    for i in range(1, 6):
        rows = min(per, max(n_train - (i - 1) * per, 0))
        _write_batch(bins / f"data_batch_{i}.bin", rng, rows)
    _write_batch(bins / "test_batch.bin", rng, n_test)
    (bins / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return folder


def _write_batch(path: Path, rng: np.random.Generator, rows: int) -> None:
    raw = rng.integers(0, 256, size=(rows, 3073), dtype=np.uint8)
    raw[:, 0] = rng.integers(0, 10, size=rows)
    raw.tofile(path)


def cifar_folder(archive: str | Path, tmp: Path, quick: bool) -> tuple[Path, str]:
    """An extracted CIFAR folder for the peer (it wants the layout) and what it holds, in words."""
    archive = Path(archive)
    if archive.is_file() and not quick:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp / "cifar", filter="data")
        return tmp / "cifar", f"real CIFAR-10 sample ({archive.name})"
    n = 600 if quick else 5000
    return write_synthetic_cifar(tmp / "cifar", n, 200), f"synthetic uint8 images of CIFAR's shape ({n} train)"


def train_cifar_timed(folder: str, overrides: list[tuple[str, str]]) -> tuple[Any, Any, list[float]]:
    """Train one `cifar` study trial (the study with `overrides`) through regsearch's own trainer; returns (the
    prepared experiment, the model, each epoch's training seconds with its evaluation taken out)."""
    import optuna

    import regsearch._trainer as trainer
    from regsearch._experiment import prepare
    from regsearch._study_file import load_study
    from regsearch._trial import build_trial

    spec = load_study("cifar", overrides)
    exp = prepare(spec, device="cpu", data_dir=folder)
    model, applied, lr = build_trial(exp, optuna.trial.FixedTrial({"lr": 0.05}), 1)
    eval_s = [0.0]
    evaluate = trainer.evaluate

    def timed_evaluate(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return evaluate(*a, **k)
        finally:
            eval_s[0] += time.perf_counter() - start

    trainer.evaluate = timed_evaluate
    marks = [(time.perf_counter(), 0.0)]
    try:
        trainer.fit(model, exp.data, applied, spec.training, lr=lr, device=exp.device, seed=1,
                    on_epoch=lambda epoch, metrics: marks.append((time.perf_counter(), eval_s[0])))
    finally:
        trainer.evaluate = evaluate
    return exp, model, [(t1 - t0) - (e1 - e0) for (t0, e0), (t1, e1) in zip(marks, marks[1:])]


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="regsearch-bench-")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def report(name: str, args: argparse.Namespace, rows: list[tuple[str, dict | None, str]],
           extra: dict[str, Any]) -> dict[str, Any]:
    """Print a table (measure, median, min, max, unit) plus the extra figures, and write the JSON."""
    print(f"\n{name} ({DATE}; {machine()})")
    print(f"{'measure':<44} {'median':>10} {'min':>10} {'max':>10}  unit")
    for label, s, unit in rows:
        if s is None:
            print(f"{label:<44} {'-':>10} {'-':>10} {'-':>10}  {unit}")
        else:
            print(f"{label:<44} {fmt(s['median']):>10} {fmt(s['min']):>10} {fmt(s['max']):>10}  {unit}")
    for key, value in extra.items():
        if not isinstance(value, (dict, list)):
            print(f"{key:<44} {fmt(value):>10}")
    result = {"benchmark": name, "date": DATE, "machine": machine(), "quick": args.quick,
              "measures": {label: dict(s, unit=unit) if s else None for label, s, unit in rows}, **extra}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return result
