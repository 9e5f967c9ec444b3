"""What a study stores grows with its work: journal bytes, `show` time and per-trial overhead on a small table,
and the bytes PostgreSQL writes per trial at 50 and at 500 epochs.

Part 1 runs the shipped `tabular` study (its 1,500-step budget: hundreds of epochs on a small table) for 20 trials
on 1,000 rows of the UCI adult table, tracked in MLflow (sqlite) as a user's run is, in a child process; it
reports the journal's size, `regsearch show`'s wall time and, per trial, its wall time over the time spent
training it (`train_s`, the trainer's own time, evaluation per epoch included). Part 2 runs one trial of 50 and
one of 500 epochs on 400 rows of the wine table into a fresh PostgreSQL database and reads how far the
write-ahead log moved during each (`pg_current_wal_insert_lsn`: every byte the server wrote for it, the rows,
their indexes and any rewrite of a row; other work on the server at the time counts too): bytes per epoch should
not grow with the number of epochs.

usage: python benchmarks/storage_growth.py [--quick] [--trials 20] [--pg postgresql://postgres@127.0.0.1:5432]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

TABLES = common.REPO.parent / "shared" / "datasets" / "tabular"


def write_table(folder: Path, quick: bool) -> tuple[str, str, str]:
    """1,000 training rows and 250 test rows of adult (400/100 when quick), stratified; (train, test, target)."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    rows = 500 if quick else 1250
    if (TABLES / "adult-train.csv").is_file():
        raw = pd.read_csv(TABLES / "adult-train.csv", skipinitialspace=True)
        target = "income"
    else:  # a user's machine without the shared tables: a synthetic table of the same kind
        import numpy as np

        rng = np.random.default_rng(0)
        raw = pd.DataFrame(rng.normal(size=(rows * 2, 12)), columns=[f"x{i}" for i in range(12)])
        raw["income"] = (raw.x0 + raw.x1 > 0).map({True: ">50K", False: "<=50K"})
        target = "income"
    sample, _ = train_test_split(raw, train_size=rows, stratify=raw[target], random_state=0)
    train, test = train_test_split(sample, test_size=0.2, stratify=sample[target], random_state=0)
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    return str(folder / "train.csv"), str(folder / "test.csv"), target


def journal_child(trials: int, quick: bool) -> dict:
    import optuna

    import regsearch
    from regsearch._storage import open_storage

    with tempfile.TemporaryDirectory(prefix="regsearch-bench-") as tmp:
        folder = Path(tmp)
        os.chdir(folder)
        train, test, target = write_table(folder, quick)
        overrides = [("data.path", train), ("data.test_path", test), ("data.target", target)]
        if quick:
            overrides.append(("training.steps", "200"))
        start = time.perf_counter()
        regsearch.optimize("tabular", study_name="small", n_trials=trials, overrides=overrides, device="cpu",
                           tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        optimize_s = time.perf_counter() - start
        journal = folder / "regsearch.journal"
        start = time.perf_counter()
        shown = subprocess.run([common.regsearch_exe(), "show", "--study", "small"], capture_output=True, text=True,
                               cwd=folder, timeout=600)
        show_s = time.perf_counter() - start
        if shown.returncode != 0:
            raise RuntimeError(shown.stderr)
        study = optuna.load_study(study_name="small", storage=open_storage(str(journal)))
        finished = [t for t in study.trials if t.datetime_complete and t.user_attrs.get("train_s")]
        walls = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished]
        trains = [t.user_attrs["train_s"] for t in finished]
        epochs = [t.user_attrs.get("epochs") for t in finished]
        os.chdir("/")
        return {"journal_bytes": journal.stat().st_size, "show_s": show_s, "optimize_s": optimize_s,
                "wall_over_train": [w / t for w, t in zip(walls, trains)], "wall_s": walls, "train_s": trains,
                "epochs": epochs, "states": [t.state.name for t in finished], "trials": len(study.trials)}


def _pg(url: str, sql: str) -> list[tuple]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        result = conn.execute(sqlalchemy.text(sql))
        rows = [tuple(r) for r in result] if result.returns_rows else []
    engine.dispose()
    return rows


def postgres_child(server: str, epochs_list: list[int], quick: bool) -> dict:
    import pandas as pd

    import regsearch

    database = "regsearch_bench_growth"
    _pg(f"{server}/postgres", f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    _pg(f"{server}/postgres", f"CREATE DATABASE {database}")
    url = f"{server}/{database}"
    out = {}
    with tempfile.TemporaryDirectory(prefix="regsearch-bench-") as tmp:
        table = Path(tmp) / "wine.csv"
        source = TABLES / "winequality-white.csv"
        if source.is_file():
            pd.read_csv(source).head(400).to_csv(table, index=False)
            target = "quality"
        else:
            write_table(Path(tmp), True)
            table, target = Path(tmp) / "train.csv", "income"
        for epochs in epochs_list:
            regsearch.optimize("tabular", study_name=f"warm{epochs}", n_trials=1, tracking=False, storage=url,
                               overrides=[("data.path", str(table)), ("data.target", target),
                                          ("training.epochs", "2"), ("search.baseline", "false")])
            before = _pg(url, "SELECT pg_current_wal_insert_lsn()")[0][0]
            start = time.perf_counter()
            regsearch.optimize("tabular", study_name=f"e{epochs}", n_trials=1, tracking=False, storage=url,
                               overrides=[("data.path", str(table)), ("data.target", target),
                                          ("training.epochs", str(epochs)), ("training.batch_size", "512"),
                                          ("search.pruner.name", "none"), ("search.baseline", "false")])
            seconds = time.perf_counter() - start
            after = _pg(url, "SELECT pg_current_wal_insert_lsn()")[0][0]
            wal = _pg(url, f"SELECT pg_wal_lsn_diff('{after}', '{before}')")[0][0]
            out[str(epochs)] = {"wal_bytes": int(wal), "seconds": seconds}
    _pg(f"{server}/postgres", f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        quick = sys.argv[3] == "quick"
        if sys.argv[2] == "journal":
            print(json.dumps(journal_child(int(sys.argv[4]), quick)))
        else:
            print(json.dumps(postgres_child(sys.argv[4], [int(e) for e in sys.argv[5].split(",")], quick)))
        return
    ap = common.parser(__doc__, "storage_growth")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432",
                    help="a PostgreSQL server (its user may create databases); '' skips part 2")
    a = ap.parse_args()
    mode = "quick" if a.quick else "full"
    trials = 2 if a.quick else a.trials
    me = [sys.executable, __file__, "--child"]
    journal = common.run_json([*me, "journal", mode, str(trials)])
    rows = [("journal file after the study", common.summary([journal["journal_bytes"] / 1e6]), "MB"),
            ("`regsearch show` (whole process)", common.summary([journal["show_s"]]), "s"),
            ("trial wall time / its training time", common.summary(journal["wall_over_train"]), "ratio"),
            ("trial wall time less its training time", common.summary(
                [w - t for w, t in zip(journal["wall_s"], journal["train_s"])]), "s"),
            ("epochs per trial", common.summary([e for e in journal["epochs"] if e]), "epochs")]
    extra: dict = {"journal": journal}
    if a.pg:
        epochs = [5, 20] if a.quick else [50, 500]
        try:
            pg = common.run_json([*me, "postgres", mode, a.pg, ",".join(map(str, epochs))])
        except RuntimeError as exc:
            pg = {"skipped": str(exc).splitlines()[-1]}
        extra["postgres"] = pg
        for e in epochs:
            if str(e) in pg:
                rows.append((f"PostgreSQL WAL bytes per epoch, {e}-epoch trial",
                             common.summary([pg[str(e)]["wal_bytes"] / e]), "bytes"))
    common.report("storage_growth", a, rows, extra)


if __name__ == "__main__":
    main()
