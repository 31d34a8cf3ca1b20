"""Issue 24: what a job's read asks of MLflow is bounded — nothing for a job that never reached Ray, one search in
the job's own experiment, a miss remembered — and the ETA after a resume counts only the pace since the restart.
Over a real MLflow tracking store (SQLite)."""

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from service.progress import RunReader
from service.routes.jobs import progress_of, run_id
from service.store import new_job

pytestmark = pytest.mark.timeout(300, method="thread")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def job_through(states: list[tuple[str, datetime]], epochs: int = 10, uri: str = "sqlite://"):
    job = new_job(
        "alice",
        {
            "training": {"epochs": epochs},
            "data": {"dataset": "fashion-mnist"},
            "tracking": {"mlflow_uri": uri, "experiment": None},
        },
    )
    job.transitions = states
    job.status = states[-1][0]
    return job


def test_the_eta_after_a_resume_counts_only_the_epochs_since_the_restart(mlflow_uri):
    start = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    resumed = start + timedelta(minutes=30)
    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.create_experiment("eta")).info.run_id
    stamps = [start + timedelta(minutes=5 * k) for k in range(1, 4)] + [
        resumed + timedelta(seconds=10 * k) for k in range(1, 3)
    ]
    client.log_batch(
        run, metrics=[Metric("val/loss", 1.0 / (k + 1), int(at.timestamp() * 1000), k) for k, at in enumerate(stamps)]
    )
    latest = RunReader([mlflow_uri]).latest(mlflow_uri, run, since=resumed)
    assert (latest.epochs, latest.epochs_since) == (5, 2)

    job = job_through(
        [
            ("queued", start),
            ("submitted", start),
            ("running", start),
            ("interrupted", resumed),
            ("submitted", resumed),
            ("running", resumed),
        ]
    )
    progress = progress_of(job, latest, now=resumed + timedelta(seconds=20))
    # 2 epochs in the 20 s since the restart, 5 of 10 left: 50 s. Counting all 5 epochs done in those 20 s (as
    # b867172 did) gave 20 s.
    assert (progress.epoch, progress.epochs, progress.eta_s) == (5, 10, pytest.approx(50.0))
    assert progress_of(job_through(job.transitions[:-1]), latest, resumed).eta_s is None  # not running: no ETA


class CountingRuns:
    def __init__(self, reader: RunReader) -> None:
        self.reader, self.searches = reader, 0

    def find_run(self, *args):
        self.searches += 1
        return self.reader.find_run(*args)


def test_mlflow_is_never_asked_about_a_job_that_never_reached_ray_and_a_miss_is_remembered(mlflow_uri):
    reader = RunReader([mlflow_uri])
    runs = CountingRuns(reader)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(runs=runs, store=None)))
    moment = datetime.now(UTC)
    never = job_through([("queued", moment), ("cancelled", moment)], uri=mlflow_uri)
    assert run_id(request, never) is None and runs.searches == 0  # b867172 searched every experiment for it

    ended = job_through([("queued", moment), ("submitted", moment), ("failed", moment)], uri=mlflow_uri)
    calls = []
    client = reader.client(mlflow_uri)
    client.search_experiments = lambda *a, **k: calls.append("search_experiments")  # never: one experiment only
    original = client.get_experiment_by_name
    client.get_experiment_by_name = lambda name: calls.append(name) or original(name)
    assert run_id(request, ended) is None and run_id(request, ended) is None
    assert calls == ["san/fashion-mnist"]  # asked once, in the job's own experiment; the miss remembered
