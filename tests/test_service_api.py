"""The REST API in process (the real app and store), with no job leaving the queue (limit 0) and no Ray reachable:
auth, ownership, validation, body limits, idempotency, 100 concurrent POSTs; and the CLI client against uvicorn."""

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.store import JobStore
from tests.services import BIN, TOKENS, Service

pytestmark = pytest.mark.timeout(300, method="thread")

SPEC = {"model": {"name": "lenet5", "attention": "san-c"}, "training": {"epochs": 2, "batch_size": 32},
        "lr": {"peak_epoch": 1}}  # fmt: skip


SETTINGS = {"max_submitted": 0, "ray_address": "http://127.0.0.1:9", "max_epochs": 100, "max_body_bytes": 8192}


@pytest.fixture(scope="module")
def service(in_process):
    return in_process(**SETTINGS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """uvicorn itself (``san serve``), for the one test whose client is another process: the CLI."""
    service = Service(tmp_path_factory.mktemp("served"), **SETTINGS).start()
    yield service
    service.stop()


def test_health_is_open_and_everything_else_needs_a_known_token(service):
    with service.client(None) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/models"), ("GET", "/v1/jobs/x")):
            response = anonymous.request(method, path)
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == "Bearer" and "token" in response.json()["detail"]
        assert anonymous.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
        ready = anonymous.get("/readyz")
        assert ready.status_code == 503  # Ray is not there
        checks = ready.json()["checks"]
        assert checks["database"]["status"] == "ok" and checks["ray"]["status"] == "error"


def test_a_job_is_stored_queued_with_its_location_and_only_its_owner_sees_it(service):
    with service.client("alice") as alice, service.client("bob") as bob:
        created = alice.post("/v1/jobs", json=SPEC)
        assert created.status_code == 201
        job = created.json()
        assert created.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] == "queued" and job["ray_submission_id"] is None
        assert job["spec"]["model"]["attention"] == "san-c" and job["spec"]["training"]["epochs"] == 2
        assert job["spec"]["tracking"]["mlflow_uri"].startswith("sqlite:///")  # filled in: where it will log
        assert alice.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
        for method, suffix in (("GET", ""), ("POST", "/cancel"), ("GET", "/logs"), ("GET", "/metrics")):
            assert bob.request(method, f"/v1/jobs/{job['id']}{suffix}").status_code == 404, suffix
        assert job["id"] not in {j["id"] for j in bob.get("/v1/jobs").json()["items"]}
        assert alice.get(f"/v1/jobs/{job['id']}/logs").text == ""


def test_bad_specs_get_422_naming_the_field_and_the_allowed_values(service):
    cases = [
        ({"model": {"name": "lenet9"}}, ["body", "model", "name"], "choose one of: lenet5"),
        ({"model": {"attention": "magic"}}, ["body", "model", "attention"], "san-c"),
        ({"data": {"dataset": "imagenet-42"}}, ["body", "data"], "fashion-mnist"),
        ({"data": {"train_path": "../../etc/passwd", "val_path": "x"}}, ["body", "data", "train_path"],
         "outside the data root"),
        ({"training": {"epochs": 101}}, ["body", "training", "epochs"], "limit of 100"),
        ({"training": {"epochs": 0}}, ["body", "training", "epochs"], "greater than or equal to 1"),
        ({"training": {"amp": "bf16"}}, ["body"], "use_gpu"),
        ({"modle": {}}, ["body", "modle"], "Extra inputs"),
    ]  # fmt: skip
    with service.client() as alice:
        for body, loc, text in cases:
            response = alice.post("/v1/jobs", json={**SPEC, **body})
            assert response.status_code == 422, body
            error = response.json()["detail"][0]
            assert error["loc"][: len(loc)] == loc and text in error["msg"], (body, error)
        assert alice.get("/v1/jobs", params={"status": "lost"}).status_code == 422


def test_a_body_over_the_limit_is_413_and_not_stored(service):
    with service.client() as alice:
        before = alice.get("/v1/jobs").json()["total"]
        big = {**SPEC, "tracking": {"tags": {"x": "y" * 10_000}}}
        response = alice.post("/v1/jobs", json=big)
        assert response.status_code == 413 and "8192 bytes" in response.json()["detail"]
        assert alice.get("/v1/jobs").json()["total"] == before


def test_100_concurrent_posts_store_100_distinct_queued_jobs_and_a_repeated_key_one(service):
    def post(n: int) -> httpx.Response:
        with service.client() as alice:
            return alice.post("/v1/jobs", json={**SPEC, "training": {"epochs": 2, "seed": n}})

    with ThreadPoolExecutor(100) as pool:  # all 100 in flight at once
        responses = list(pool.map(post, range(100)))
    assert [r.status_code for r in responses] == [201] * 100
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 100
    store = JobStore(f"sqlite:///{service.root / 'runs' / 'service.db'}")
    stored = {job.id: job for job in store.in_states(("queued",))}
    assert ids <= set(stored)  # none lost, all still queued (limit 0)
    assert sorted(stored[i].spec["training"]["seed"] for i in ids) == list(range(100))  # none duplicated
    with service.client() as alice:
        keyed = [alice.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "k-1"}) for _ in range(2)]
        assert [r.status_code for r in keyed] == [201, 200] and keyed[0].json()["id"] == keyed[1].json()["id"]
        other = alice.post("/v1/jobs", json={**SPEC, "training": {"epochs": 3}}, headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 409
    store.close()


def test_pagination_and_status_filter(service):
    with service.client("bob") as bob:
        made = [bob.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(3)]
        assert bob.post(f"/v1/jobs/{made[0]}/cancel").json()["status"] == "cancelled"
        assert bob.post(f"/v1/jobs/{made[0]}/cancel").status_code == 409
        page = bob.get("/v1/jobs", params={"limit": 2}).json()
        assert page["total"] == 3 and [j["id"] for j in page["items"]] == made[:0:-1]
        cancelled = bob.get("/v1/jobs", params={"status": "cancelled"}).json()
        assert [j["id"] for j in cancelled["items"]] == [made[0]]
        assert [s["status"] for s in cancelled["items"][0]["transitions"]] == ["queued", "cancelled"]


def test_catalog_lists_what_a_spec_may_name(service):
    with service.client() as alice:
        assert "resnet50" in alice.get("/v1/models").json()["models"]
        assert {"san-c", "san-d", "cbam", "bam"} <= set(alice.get("/v1/attention").json()["attention"])
        datasets = {d["name"]: d for d in alice.get("/v1/datasets").json()["datasets"]}
        assert datasets["fashion-mnist"]["embedded"] and datasets["cifar20"]["num_classes"] == 20
        schema = alice.get("/openapi.json").json()
        assert "JobSpec" in schema["components"]["schemas"]


def test_a_waiting_jobs_view_gives_its_place_in_the_dispatchers_order_and_why_it_waits(service):
    with service.client() as alice:
        ids = [alice.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(2)]
        ranking = service.parts.jobs.dispatcher
        deadline = time.monotonic() + 30
        while not all(job_id in ranking.ranking.place for job_id in ids) and time.monotonic() < deadline:
            time.sleep(0.1)  # the next tick ranks them
        views = [alice.get(f"/v1/jobs/{job_id}").json()["queue"] for job_id in ids]
        listed = {job["id"]: job["queue"] for job in alice.get("/v1/jobs", params={"status": "queued"}).json()["items"]}
    places = [ranking.ranking.place[job_id] + 1 for job_id in ids]
    assert [view["position"] for view in views] == places and places[0] < places[1]
    assert [listed[job_id] for job_id in ids] == views
    for view in views:
        assert view["reason"].startswith("the service submits no jobs now (SAN_MAX_SUBMITTED=0)")
        assert view["fits"] is True and view["ahead"] == view["position"] - 1


def test_the_cli_client_submits_lists_shows_and_fails_in_one_line(served, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    env = {"SAN_API_URL": served.url, "SAN_API_TOKEN": TOKENS["alice"], "PATH": str(BIN)}

    def san(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "san"), "jobs", *args], capture_output=True, text=True, env=env, timeout=60)

    submitted = san("submit", str(spec))
    assert submitted.returncode == 0 and " queued" in submitted.stdout
    job_id = submitted.stdout.split()[0]
    assert job_id in san("list", "--status", "queued").stdout
    assert json.loads(san("show", job_id, "--json").stdout)["id"] == job_id
    waiting = next(san("show", job_id).stdout for _ in range(50) if "position" in san("show", job_id).stdout)
    assert re.search(r"\n  waiting: position \d+: the service submits no jobs now \(SAN_MAX_SUBMITTED=0\)", waiting)
    assert "cancelled" in san("cancel", job_id).stdout
    spec.write_text(json.dumps({**SPEC, "model": {"name": "lenet9"}}))
    bad = san("submit", str(spec))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "lenet9" in bad.stderr
    env["SAN_API_TOKEN"] = "wrong"
    denied = san("list")
    assert denied.returncode == 2 and "HTTP 401" in denied.stderr
