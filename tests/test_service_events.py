"""``GET /v1/jobs/{id}/events`` and ``/v1/studies/{id}/events`` (issue 28, point 3) over uvicorn (``san serve``): a
client that disconnects mid-job and reconnects with ``Last-Event-ID`` gets every epoch and every log line exactly
once — also after the API was killed (-9) and started again. The job's record, its MLflow run and its log are
written by the test as the dispatcher and the driver would (no Ray here), so each step is known."""

import os
import signal
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from service.errors import Invalid
from service.events import Cursor
from service.store import JobStore
from tests.services import BIN, TOKENS, Service, free_port, read_events
from training.states import JobStatus

pytestmark = [pytest.mark.timeout(300, method="thread")]
SPEC = {"training": {"epochs": 3}, "lr": {"schedule": "cosine"}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("events")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    service = Service(root, max_submitted=0, ray_address=f"http://127.0.0.1:{free_port()}", mlflow_uri=uri).start()
    store = JobStore(f"sqlite:///{root / 'runs' / 'service.db'}")
    yield service, store, uri
    store.close()
    service.stop()


def append(path, text: str) -> None:
    with open(path, "a") as file:
        file.write(text)


def log_epoch(uri: str, run_id: str, epoch: int) -> None:
    keys = ("val/loss", "val/top1", "train/loss")
    MlflowClient(uri).log_batch(run_id, metrics=[Metric(key, 0.1 * epoch + i, 0, epoch) for i, key in enumerate(keys)])


def test_a_client_reconnecting_with_last_event_id_gets_every_epoch_once_across_an_api_kill(served):
    service, store, uri = served
    with service.client() as alice:
        job_id = alice.post("/v1/jobs", json=SPEC).json()["id"]
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("events")).info.run_id
    store.transition(job_id, JobStatus.SUBMITTED)
    store.transition(job_id, JobStatus.RUNNING, mlflow_run_id=run_id)  # as the dispatcher records the report
    log_epoch(uri, run_id, 0)
    job_log = service.root / "runs" / "jobs" / job_id / "log.txt"  # the driver's (training.driver_log)
    job_log.parent.mkdir(parents=True, exist_ok=True)
    append(job_log, "(RayTrainWorker pid=7) epoch 1/3 [1/15] train/loss 0.4\nresuming ")  # a line being written
    path = f"/v1/jobs/{job_id}/events"
    first = read_events(service, path, until=lambda kind, data: kind == "log")  # then the client goes away
    assert [(kind, data.get("status", data.get("epoch", data.get("line")))) for kind, _, data in first] == [
        ("state", "queued"),
        ("state", "submitted"),
        ("state", "running"),
        ("epoch", 0),
        ("log", "(RayTrainWorker pid=7) epoch 1/3 [1/15] train/loss 0.4"),
    ]
    assert first[3][2]["val/top1"] == pytest.approx(1.0)
    log_epoch(uri, run_id, 1)
    append(job_log, "epoch 2 at step 0\nsecond\n")
    second = read_events(service, path, last=first[-1][1], until=lambda kind, data: data.get("line") == "second")
    assert [(kind, data.get("epoch", data.get("line"))) for kind, _, data in second] == [
        ("epoch", 1),
        ("log", "resuming epoch 2 at step 0"),
        ("log", "second"),
    ]
    # The API is killed (-9) and started again; the job goes on meanwhile.
    os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait()
    log_epoch(uri, run_id, 2)
    append(job_log, "third\n")
    store.transition(job_id, JobStatus.SUCCEEDED)
    service.start()
    rest = read_events(service, path, last=second[-1][1])
    assert [(kind, data.get("status", data.get("epoch", data.get("line")))) for kind, _, data in rest] == [
        ("state", "succeeded"),
        ("epoch", 2),
        ("log", "third"),
        ("end", "succeeded"),
    ]
    epochs = [data["epoch"] for events in (first, second, rest) for kind, _, data in events if kind == "epoch"]
    assert epochs == [0, 1, 2]  # each exactly once
    lines = [data["line"] for events in (first, second, rest) for kind, _, data in events if kind == "log"]
    assert lines == job_log.read_text().splitlines()  # each exactly once, in order
    # a whole stream of an ended job, from the start: every event, then the end
    whole = read_events(service, path)
    assert [kind for kind, _, _ in whole] == ["state"] * 4 + ["epoch"] * 3 + ["log"] * 4 + ["end"]
    # `san jobs watch` follows the same stream to its end, one line per event, exit 0 for a succeeded job
    env = {"SAN_API_URL": service.url, "SAN_API_TOKEN": TOKENS["alice"], "PATH": str(BIN)}
    watched = subprocess.run(
        [str(BIN / "san"), "jobs", "watch", job_id], capture_output=True, text=True, env=env, timeout=60
    )
    assert watched.returncode == 0, watched.stderr
    shown = watched.stdout.splitlines()
    assert len(shown) == 8 and "epoch 3" in shown[-2] and shown[-1].endswith("ended succeeded")
    # with --logs, the log's lines too, as written (brackets in them are text, not markup)
    watched = subprocess.run(
        [str(BIN / "san"), "jobs", "watch", job_id, "--logs"], capture_output=True, text=True, env=env, timeout=60
    )
    assert watched.returncode == 0 and watched.stdout.splitlines()[7:11] == lines


def test_event_streams_are_the_owners_and_a_bad_last_event_id_is_a_422(served):
    service = served[0]
    with service.client() as alice, service.client("bob") as bob:
        job_id = alice.post("/v1/jobs", json=SPEC).json()["id"]
        assert bob.get(f"/v1/jobs/{job_id}/events").status_code == 404
        bad = alice.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "zzz"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "last-event-id"]
        study = alice.post(
            "/v1/studies",
            json={"name": "events", "base": SPEC, "seeds": [0], "axes": {"model.attention": ["none", "cbam"]}},
        )
        assert study.status_code == 201, study.text
        study = study.json()
        assert bob.get(f"/v1/studies/{study['id']}/events").status_code == 404
        assert alice.post(f"/v1/studies/{study['id']}/cancel").status_code == 200
    events = read_events(service, f"/v1/studies/{study['id']}/events")
    states = [(data["cell"], data["status"]) for kind, _, data in events if kind == "state"]
    assert sorted(states) == [("c000", "cancelled"), ("c000", "queued"), ("c001", "cancelled"), ("c001", "queued")]
    assert events[-1][0] == "end" and events[-1][2]["status"] == "cancelled"


CURSORS = st.from_regex(r"-?\d{1,25}\.-?\d{1,12}(\.-?\d{1,18})?", fullmatch=True)


@given(st.one_of(st.none(), st.text(max_size=80), CURSORS))
def test_any_last_event_id_is_a_cursor_or_a_422_naming_the_header(text):
    try:
        cursor = Cursor.parse(text)
    except Invalid as error:
        assert error.detail[0]["loc"] == ["header", "last-event-id"]
    else:
        assert cursor.state >= 0 and cursor.epoch >= -1 and cursor.log >= 0
        assert text is None or not text.strip() or Cursor.parse(str(cursor)) == cursor
