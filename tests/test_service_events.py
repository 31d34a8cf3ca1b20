"""``GET /v1/jobs/{id}/events`` and ``/v1/studies/{id}/events`` (issue 28, point 3) over uvicorn (``san serve``): a
client that disconnects mid-job and reconnects with ``Last-Event-ID`` gets every epoch exactly once — also after
the API was killed (-9) and started again. The job's record and its MLflow run are written by the test as the
dispatcher and the driver would (no Ray here), so each step is known."""

import os
import signal
import subprocess

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from service.cli import sse_events
from service.errors import Invalid
from service.events import Cursor
from service.store import JobStore
from tests.services import BIN, TOKENS, Service, free_port
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


def read(service: Service, path: str, last: str | None = None, until=None) -> list[tuple[str, str, dict]]:
    """The stream's events until ``until(kind, data)`` (else its end), then the connection is dropped."""
    headers = {"Authorization": f"Bearer {TOKENS['alice']}"} | ({"Last-Event-ID": last} if last else {})
    found = []
    with httpx.stream("GET", f"{service.url}{path}", headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for kind, event_id, data in sse_events(response.iter_lines()):
            found.append((kind, event_id, data))
            if kind == "end" or (until and until(kind, data)):
                break
    return found


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
    path = f"/v1/jobs/{job_id}/events"
    first = read(service, path, until=lambda kind, data: kind == "epoch")  # then the client goes away
    assert [(kind, data.get("status", data.get("epoch"))) for kind, _, data in first] == [
        ("state", "queued"),
        ("state", "submitted"),
        ("state", "running"),
        ("epoch", 0),
    ]
    assert first[-1][2]["val/top1"] == pytest.approx(1.0)
    log_epoch(uri, run_id, 1)
    second = read(service, path, last=first[-1][1], until=lambda kind, data: kind == "epoch")
    assert [(kind, data.get("epoch")) for kind, _, data in second] == [("epoch", 1)]
    # The API is killed (-9) and started again; the job goes on meanwhile.
    os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait()
    log_epoch(uri, run_id, 2)
    store.transition(job_id, JobStatus.SUCCEEDED)
    service.start()
    rest = read(service, path, last=second[-1][1])
    assert [(kind, data.get("status", data.get("epoch"))) for kind, _, data in rest] == [
        ("state", "succeeded"),
        ("epoch", 2),
        ("end", "succeeded"),
    ]
    epochs = [data["epoch"] for events in (first, second, rest) for kind, _, data in events if kind == "epoch"]
    assert epochs == [0, 1, 2]  # each exactly once
    # a whole stream of an ended job, from the start: every event, then the end
    whole = read(service, path)
    assert [kind for kind, _, _ in whole] == ["state"] * 4 + ["epoch"] * 3 + ["end"]
    # `san jobs watch` follows the same stream to its end, one line per event, exit 0 for a succeeded job
    env = {"SAN_API_URL": service.url, "SAN_API_TOKEN": TOKENS["alice"], "PATH": str(BIN)}
    watched = subprocess.run(
        [str(BIN / "san"), "jobs", "watch", job_id], capture_output=True, text=True, env=env, timeout=60
    )
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    assert len(lines) == 8 and "epoch 3" in lines[-2] and lines[-1].endswith("ended succeeded")


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
    events = read(service, f"/v1/studies/{study['id']}/events")
    states = [(data["cell"], data["status"]) for kind, _, data in events if kind == "state"]
    assert sorted(states) == [("c000", "cancelled"), ("c000", "queued"), ("c001", "cancelled"), ("c001", "queued")]
    assert events[-1][0] == "end" and events[-1][2]["status"] == "cancelled"


@given(st.one_of(st.none(), st.text(max_size=80), st.from_regex(r"-?\d{1,25}\.-?\d{1,12}", fullmatch=True)))
def test_any_last_event_id_is_a_cursor_or_a_422_naming_the_header(text):
    try:
        cursor = Cursor.parse(text)
    except Invalid as error:
        assert error.detail[0]["loc"] == ["header", "last-event-id"]
    else:
        assert cursor.state >= 0 and cursor.epoch >= -1
        assert text is None or not text.strip() or Cursor.parse(str(cursor)) == cursor
