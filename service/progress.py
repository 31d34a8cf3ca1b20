"""What a job's MLflow run says about it: the run (found by the ``san.job_id`` tag the driver sets), epochs
done, the latest metrics and the per-epoch history."""

import logging
from collections.abc import Collection
from typing import Any

from mlflow.tracking import MlflowClient

from training.tracking import METRIC_KEYS, metric_history

log = logging.getLogger("san.service")


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

    def find_run(self, uri: str, job_id: str) -> str | None:
        client = self.client(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return None
        runs = client.search_runs(experiments, filter_string=f"tags.`san.job_id` = '{job_id}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def latest(self, uri: str, run_id: str) -> tuple[dict[str, float], int, str]:
        """(latest metrics, epochs logged, experiment id)."""
        client = self.client(uri)
        run = client.get_run(run_id)
        epochs = len(client.get_metric_history(run_id, "val/loss"))  # every task logs it each epoch
        metrics = {key: value for key, value in run.data.metrics.items() if key in METRIC_KEYS}
        return metrics, epochs, run.info.experiment_id

    def history(self, uri: str, run_id: str) -> list[dict[str, Any]]:
        """One row per epoch: ``{"epoch": k, "train/loss": …, "val/top1": …, …}``, in epoch order."""
        return metric_history(self.client(uri), run_id)
