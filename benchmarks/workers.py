"""Scale-out: digits trials per hour with 1 and 2 worker processes, and per-trial storage bookkeeping.

Trials per hour: `regsearch optimize --study digits --workers N` (tracking on, default journal storage) on
this machine, N = 1 and 2 alternating. Bookkeeping: an Optuna study whose objective does no work (one
suggested float, TPE sampler) on each storage regsearch offers — the local journal file, sqlite, and
PostgreSQL at 127.0.0.1:5432 where reachable — seconds per trial.

usage: python benchmarks/workers.py [--repeats 2] [--trials 16] [--quick]
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def study_wall(workers: int, trials: int, epochs: int) -> float:
    with common.temp_dir() as tmp:
        start = time.perf_counter()
        subprocess.run([common.regsearch_exe(), "optimize", "--study", "digits", "--n-trials", str(trials),
                        "--set", f"training.epochs={epochs}", "--workers", str(workers)], cwd=tmp, check=True,
                       capture_output=True)
        return time.perf_counter() - start


def bookkeeping(url: str, trials: int) -> float:
    import optuna

    from regsearch._storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=open_storage(url), study_name=f"bench-{uuid.uuid4().hex[:8]}",
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=10))
    start = time.perf_counter()
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=trials)
    return (time.perf_counter() - start) / trials


def postgres_database() -> tuple[str, object] | None:
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except Exception:
        return None
    name = f"regsearch_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}", (admin, name)


def main() -> None:
    ap = common.parser(__doc__, "workers")
    ap.set_defaults(repeats=2)
    ap.add_argument("--trials", type=int, default=16, help="trials per study run")
    a = ap.parse_args()
    trials, epochs, repeats = (4, 2, 1) if a.quick else (a.trials, 30, a.repeats)
    walls = common.alternate({"1 worker": lambda: study_wall(1, trials, epochs),
                              "2 workers": lambda: study_wall(2, trials, epochs)}, repeats)
    rows = []
    for name, values in walls.items():
        rows.append((f"digits study, {name}: wall", common.summary(values), "s"))
        rows.append((f"digits study, {name}: trials per hour",
                     common.summary([trials * 3600 / v for v in values]), "trials/h"))
    book_trials = 20 if a.quick else 100
    with common.temp_dir() as tmp:
        stores = {"journal file (default)": str(Path(tmp) / "b.journal"), "sqlite": f"sqlite:///{tmp}/b.db"}
        pg = postgres_database()
        if pg:
            stores["postgresql (local)"] = pg[0]
        try:
            runs = common.alternate({k: (lambda u=u: bookkeeping(u, book_trials)) for k, u in stores.items()},
                                    repeats)
        finally:
            if pg:
                admin, name = pg[1]
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                admin.close()
    for name, values in runs.items():
        rows.append((f"storage bookkeeping, {name}", common.summary([v * 1000 for v in values]), "ms/trial"))
    speedup = common.ratio(common.summary(walls["1 worker"]), common.summary(walls["2 workers"]))
    common.report("workers", a, rows, {"trials": trials, "epochs": epochs, "speedup_2_over_1": speedup,
                                       "walls": walls})


if __name__ == "__main__":
    main()
