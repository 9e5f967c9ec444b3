"""How regsearch's messages reach a terminal: one line each on stderr, MLflow's own chatter kept down."""

from __future__ import annotations

import logging
import os
import sys


def log_to_stderr(level: int) -> logging.Logger:
    """The `regsearch` logger writing bare lines to stderr at `level`; below DEBUG, MLflow and alembic say only
    warnings (the command line and the tracking process both start this way)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("regsearch")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    if level > logging.DEBUG:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow when it is imported
        for noisy in ("mlflow", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return log
