"""What a job's MLflow run says about it: the run (found by the ``san.job_id`` tag the driver sets), epochs
done, the latest metrics and the per-epoch history."""

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mlflow.tracking import MlflowClient

from training.tracking import METRIC_KEYS, metric_history

log = logging.getLogger("san.service")
MISSES_KEPT = 10_000  # jobs remembered to have no run (bounded: oldest forgotten first)
RECHECK_MISS_S = 15.0  # a running job's run may appear any moment: asked again after this long


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
        self._misses: OrderedDict[str, float | None] = OrderedDict()  # job id → when to ask again (None: never)
        self._lock = threading.Lock()

    def client(self, uri: str) -> MlflowClient:
        if uri not in self.allowed:
            raise ValueError("not an MLflow URI this service reads")
        if uri not in self._clients:
            self._clients[uri] = MlflowClient(uri)
        return self._clients[uri]

    def find_run(self, uri: str, job_id: str, experiment: str, ended: bool) -> str | None:
        """The run tagged with ``job_id`` in the job's own experiment (one search, never across experiments), or
        None — remembered: for good once the job ``ended``, else for `RECHECK_MISS_S`."""
        with self._lock:
            if job_id in self._misses and ((until := self._misses[job_id]) is None or time.monotonic() < until):
                return None
        client = self.client(uri)
        found = client.get_experiment_by_name(experiment)
        runs = (
            []
            if found is None
            else client.search_runs(
                [found.experiment_id], filter_string=f"tags.`san.job_id` = '{job_id}'", max_results=1
            )
        )
        if runs:
            return runs[0].info.run_id
        with self._lock:
            self._misses[job_id] = None if ended else time.monotonic() + RECHECK_MISS_S
            self._misses.move_to_end(job_id)
            while len(self._misses) > MISSES_KEPT:
                self._misses.popitem(last=False)
        return None

    def latest(self, uri: str, run_id: str, since: datetime | None = None) -> Latest:
        client = self.client(uri)
        run = client.get_run(run_id)
        history = client.get_metric_history(run_id, "val/loss")  # every task logs it each epoch
        since_ms = since.timestamp() * 1000 if since else 0
        metrics = {key: value for key, value in run.data.metrics.items() if key in METRIC_KEYS}
        return Latest(metrics, len(history), sum(1 for m in history if m.timestamp >= since_ms), run.info.experiment_id)

    def history(self, uri: str, run_id: str) -> list[dict[str, Any]]:
        """One row per epoch: ``{"epoch": k, "train/loss": …, "val/top1": …, …}``, in epoch order."""
        return metric_history(self.client(uri), run_id)
