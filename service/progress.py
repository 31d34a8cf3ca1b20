"""What a job's MLflow run says about it (the run its driver reported, `training.driver_report`): epochs done, the
latest metrics and the per-epoch history. Read only."""

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mlflow.tracking import MlflowClient

from training.mlflow_runs import METRIC_KEYS, metric_history

log = logging.getLogger("san.service")


@dataclass(frozen=True)
class Latest:
    metrics: dict[str, float]
    epochs: int  # epochs logged
    epochs_since: int  # of them, logged at or after the ``since`` asked for (the last (re)start)
    experiment_id: str


class RunReader:
    """Reads only from the MLflow URIs it was given (the service's configured ones): a stored spec naming another
    — a job admitted before the allow-list, a hand-edited row — gets a ValueError, and the view goes without it."""

    def __init__(self, allowed: Collection[str]) -> None:
        self.allowed = frozenset(allowed)
        self._clients: dict[str, MlflowClient] = {}

    def client(self, uri: str) -> MlflowClient:
        if uri not in self.allowed:
            raise ValueError("not an MLflow URI this service reads")
        if uri not in self._clients:
            self._clients[uri] = MlflowClient(uri)
        return self._clients[uri]

    def latest(self, uri: str, run_id: str, since: datetime | None = None) -> Latest:
        client = self.client(uri)
        run = client.get_run(run_id)
        history = client.get_metric_history(run_id, "val/loss")  # every task logs it each epoch
        since_ms = since.timestamp() * 1000 if since else 0
        metrics = {key: value for key, value in run.data.metrics.items() if key in METRIC_KEYS}
        return Latest(metrics, len(history), sum(1 for m in history if m.timestamp >= since_ms), run.info.experiment_id)

    def final(self, uri: str, run_id: str, key: str) -> float | None:
        """``key`` at the last epoch that logged a finite value (a study table's rule: never the best epoch)."""
        rows = metric_history(self.client(uri), run_id, (key,))
        return next((row[key] for row in reversed(rows) if math.isfinite(row[key])), None)

    def history(self, uri: str, run_id: str) -> list[dict[str, Any]]:
        """One row per epoch: ``{"epoch": k, "train/loss": …, "val/top1": …, …}``, in epoch order."""
        return metric_history(self.client(uri), run_id)
