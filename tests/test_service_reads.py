"""A read never writes (issue 25): every GET route answers from the stored record and what the job's reported MLflow
run says, read only; and the ETA after a resume counts only the pace since the restart (issue 24). Over the app in
process, a real store and a real MLflow tracking store (SQLite)."""

import time
from datetime import UTC, datetime, timedelta

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from sqlalchemy import event

from service.job_service import progress_of
from service.progress import RunReader
from service.store import new_job
from training.config import default_experiment
from training.states import JobStatus

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


def writes_to(store) -> list[str]:
    """Every INSERT, UPDATE or DELETE the store's engine sends from now on."""
    seen: list[str] = []

    def count(connection, cursor, statement, *args) -> None:
        if statement.lstrip().split(" ", 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    return seen


def test_no_get_of_any_route_writes_the_store_or_asks_mlflow_to_find_a_run(in_process, mlflow_uri):
    """Every GET route of the app, over a job on Ray with its run reported and a study: the store sees no write
    (b867172: a job's GET reconciled it with Ray and stored the MLflow run id it searched for)."""
    service = in_process(max_submitted=0, ray_address="http://127.0.0.1:9", mlflow_uri=mlflow_uri)
    parts = service.parts
    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.create_experiment("reads")).info.run_id
    client.log_batch(run, metrics=[Metric("val/loss", 0.5, 0, 0), Metric("val/top1", 0.8, 0, 0)])
    with service.client() as alice:
        job = alice.post("/v1/jobs", json={"training": {"epochs": 2}}).json()
        study = alice.post(
            "/v1/studies",
            json={"name": "reads", "base": {"training": {"epochs": 2}}, "axes": {"model.attention": ["none", "cbam"]}},
        )
        assert study.status_code == 201, study.text
        study = study.json()
        unreported = alice.post("/v1/jobs", json={"training": {"epochs": 2}}).json()
        # an ended job and an ended study: their event streams end (a running one's stream goes on; it is read
        # over uvicorn in tests/test_service_events.py)
        ended = alice.post("/v1/jobs", json={"training": {"epochs": 2}}).json()
        assert alice.post(f"/v1/jobs/{ended['id']}/cancel").status_code == 200
        over = alice.post(
            "/v1/studies",
            json={"name": "over", "base": {"training": {"epochs": 2}}, "axes": {"model.attention": ["none"]}},
        ).json()
        assert alice.post(f"/v1/studies/{over['id']}/cancel").status_code == 200
        deadline = time.monotonic() + 30
        while alice.get(f"/v1/studies/{over['id']}").json()["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.1)  # the finisher ends it
    store = parts.store
    store.transition(job["id"], JobStatus.SUBMITTED)
    store.transition(job["id"], JobStatus.RUNNING, mlflow_run_id=run)  # as the dispatcher records a report
    # A running job whose driver has not reported yet, though a run tagged with its id exists: b867172's GET found
    # that run by a tag search and stored its id.
    store.transition(unreported["id"], JobStatus.SUBMITTED)
    store.transition(unreported["id"], JobStatus.RUNNING)
    experiment = client.get_experiment_by_name(default_experiment("fashion-mnist"))
    tagged = client.create_run(
        experiment.experiment_id if experiment else client.create_experiment(default_experiment("fashion-mnist")),
        tags={"san.job_id": unreported["id"]},
    )
    ids = {"job_id": job["id"], "study_id": study["id"]}
    documented = service.app.openapi()["paths"]
    gets = [path for path, methods in documented.items() if "get" in methods]
    assert {"/v1/jobs/{job_id}", "/v1/studies/{study_id}/table", "/v1/jobs/{job_id}/events", "/readyz"} <= set(gets)
    compare = f"/v1/compare?a={job['id']},{unreported['id']}&b={study['id']}/c001"  # its query is required
    ended_ids = {"job_id": ended["id"], "study_id": over["id"]}
    paths = [
        compare if path == "/v1/compare" else path.format(**(ended_ids if path.endswith("/events") else ids))
        for path in gets
    ] + ["/openapi.json", "/docs"]
    paths += [
        path.format(**{**ids, "job_id": unreported["id"]})
        for path in gets
        if "{job_id}" in path and not path.endswith("/events")
    ]
    written = writes_to(store)
    with service.client() as alice, parts.jobs.dispatcher._lock:  # a tick at work (say, waiting on Ray) meanwhile
        for path in paths:
            started = time.monotonic()
            response = alice.get(path)
            assert response.status_code in (200, 503), (path, response.text)  # 503: Ray is unreachable
            assert time.monotonic() - started < 5, path  # no read waits for the tick
        shown = alice.get(f"/v1/jobs/{job['id']}").json()
        for query in ({"format": "md"}, {"format": "csv"}, {"table": "false"}):
            alice.get(f"/v1/studies/{study['id']}/table", params=query)
    assert written == []
    assert shown["mlflow_run_id"] == run and shown["metrics"]["val/top1"] == 0.8 and shown["progress"]["epoch"] == 1
    assert store.get(job["id"]).status == JobStatus.RUNNING  # Ray is unreachable: the record stands as stored
    assert tagged.info.run_id and store.get(unreported["id"]).mlflow_run_id is None
