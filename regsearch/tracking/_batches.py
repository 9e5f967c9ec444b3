"""Logging to one run in as few calls as MLflow's per-call limits allow."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from regsearch._storage import mask_url

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

logger = logging.getLogger("regsearch")


MAX_PARAMS_PER_CALL = 100


MAX_METRICS_PER_CALL = 1000


def param_entities(params: Mapping[str, object]) -> list[Param]:
    """MLflow `Param`s: values as text, passwords masked, cut at MLflow's length limit."""
    from mlflow.entities import Param

    return [Param(k, mask_url(str(v))[:6000]) for k, v in params.items()]


def log_batches(client: MlflowClient, run_id: str, *, params: Mapping[str, object] | None = None,
                metrics: list[Metric] | None = None,
                tags: Mapping[str, str] | None = None) -> None:
    """Log to one run in as few calls as MLflow's per-call limits allow; raises when the store fails."""
    from mlflow.entities import RunTag

    items = param_entities(params or {})
    for i in range(0, len(items), MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_CALL])
    metrics = metrics or []
    tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, max(len(metrics), 1 if tag_items else 0), MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_CALL], tags=tag_items if i == 0 else [])
