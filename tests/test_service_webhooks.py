"""Webhooks (issue 28, point 4) over uvicorn (``san serve``) and a receiver on loopback: every transition delivered
once the receiver answers (it fails its first 3), signed with the webhook's secret (checked here with hmac); the
API killed (-9) while a delivery waits for its answer loses none (it is sent again, with the same delivery id);
only hosts the operator allows."""

import hashlib
import hmac
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.store import JobStore
from tests.services import Service, free_port
from training.states import JobStatus

pytestmark = [pytest.mark.timeout(300, method="thread")]
SPEC = {"training": {"epochs": 3}, "lr": {"schedule": "cosine"}}


class Receiver(ThreadingHTTPServer):
    """Records every request; answers 500 to the first ``failures``, and waits ``delay_s`` before each answer."""

    def __init__(self, failures: int) -> None:
        self.failures, self.delay_s, self.seen, self.got = failures, 0.0, [], threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.seen.append((dict(self.headers), body))
                outer.got.set()
                time.sleep(outer.delay_s)
                failing = outer.failures > 0
                outer.failures -= 1
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)

    def delivered(self) -> dict[str, dict]:
        """Delivery id → payload, of the requests after the failures (the same id twice: one entry)."""
        return {headers["X-San-Delivery"]: json.loads(body) for headers, body in self.seen[3:]}


def wait(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    receiver = Receiver(failures=3)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    root = tmp_path_factory.mktemp("hooks")
    allowed = json.dumps([f"127.0.0.1:{receiver.server_port}"])
    service = Service(
        root, max_submitted=0, ray_address=f"http://127.0.0.1:{free_port()}", webhook_allowed_hosts=allowed
    ).start()
    store = JobStore(f"sqlite:///{root / 'runs' / 'service.db'}")
    yield service, store, receiver
    store.close()
    service.stop()
    receiver.shutdown()


def test_every_transition_is_delivered_signed_in_order_and_none_is_lost_when_the_api_is_killed(setup):
    service, store, receiver = setup
    url = f"http://127.0.0.1:{receiver.server_port}/hook"
    with service.client() as alice:
        created = alice.post("/v1/webhooks", json={"url": url})
        assert created.status_code == 201, created.text
        secret = created.json()["secret"]
        assert [hook["url"] for hook in alice.get("/v1/webhooks").json()] == [url]
        job_id = alice.post("/v1/jobs", json=SPEC).json()["id"]
    for status in (JobStatus.SUBMITTED, JobStatus.RUNNING, JobStatus.SUCCEEDED):
        store.transition(job_id, status)  # as the dispatcher would
    wait(lambda: len(receiver.delivered()) == 3)  # after 3 failed attempts of the first (backoff 1, 2, 4 s)
    assert [headers["X-San-Delivery"] for headers, _ in receiver.seen[:4]] == [
        receiver.seen[0][0]["X-San-Delivery"]
    ] * 4
    payloads = list(receiver.delivered().values())
    assert [(p["job_id"], p["status"]) for p in payloads] == [
        (job_id, s) for s in ("submitted", "running", "succeeded")
    ]
    for headers, body in receiver.seen:
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-San-Signature"], expected)
    # The API killed while a delivery waits for its answer: it is sent again after the restart, none is lost.
    receiver.delay_s, receiver.got = 3.0, threading.Event()
    with service.client() as alice:
        other = alice.post("/v1/jobs", json=SPEC).json()["id"]
        assert alice.post(f"/v1/jobs/{other}/cancel").status_code == 200
    assert receiver.got.wait(30)
    os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait()
    receiver.delay_s = 0.0
    service.start()
    wait(lambda: len(receiver.delivered()) == 4)
    ids = [headers["X-San-Delivery"] for headers, _ in receiver.seen[-2:]]
    assert ids[0] == ids[1]  # the one the killed API never saw answered, again
    assert list(receiver.delivered().values())[-1] | {"at": None} == {
        "kind": "job",
        "job_id": other,
        "status": "cancelled",
        "at": None,
    }


def test_only_hosts_the_operator_allows_and_only_the_owner_deletes(setup):
    service, _, receiver = setup
    with service.client() as alice, service.client("bob") as bob:
        for url, text in (
            (f"http://127.0.0.1:{receiver.server_port + 1}/", "is not one this service may call"),
            ("http://10.0.0.1/hook", "10.0.0.1:80 is not one"),
            ("file:///etc/passwd", "http://"),
            (f"http://user:pw@127.0.0.1:{receiver.server_port}/", "no credentials"),
        ):
            refused = alice.post("/v1/webhooks", json={"url": url})
            assert refused.status_code == 422 and text in refused.json()["detail"][0]["msg"], refused.text
            assert refused.json()["detail"][0]["loc"] == ["body", "url"]
        hook = alice.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{receiver.server_port}/b"}).json()
        assert bob.delete(f"/v1/webhooks/{hook['id']}").status_code == 404 and bob.get("/v1/webhooks").json() == []
        assert alice.delete(f"/v1/webhooks/{hook['id']}").status_code == 204
        assert hook["id"] not in [h["id"] for h in alice.get("/v1/webhooks").json()]
