"""Issue 24 against the API in process (no job leaving the queue, no Ray): a request's cost is
bounded before anything is built — a 30-axis study is a 422 at once while ``/healthz`` answers and the API does not
grow —, each principal's share is a 429 with ``Retry-After`` that leaves other principals alone, and the tags the
service writes are the service's alone."""

import os
import threading
import time
from pathlib import Path

import pytest

from tests.services import free_port

pytestmark = pytest.mark.timeout(300, method="thread")

SPEC = {"model": {"name": "lenet5"}, "training": {"epochs": 2, "batch_size": 32}, "lr": {"peak_epoch": 1}}
STUDY = {"name": "small", "base": SPEC, "seeds": [0, 1], "axes": {"model.attention": ["none", "san-c"]}}


@pytest.fixture(scope="module")
def service(in_process):
    return in_process(
        max_submitted=0,
        ray_address=f"http://127.0.0.1:{free_port()}",
        max_jobs_per_principal=6,
        max_studies_per_principal=1,
        max_study_jobs=8,
        retry_after_s=7,
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError("VmRSS")


def wait_for_probes(answered: list[float], count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(answered) < count:
        assert time.monotonic() < deadline, f"/healthz answered {len(answered)} times, not {count}"
        time.sleep(0.01)


def test_a_30_axis_study_is_a_422_at_once_while_healthz_answers_and_the_api_does_not_grow(service):
    """~1.5 kB that expanded 2**30 cells in the API's memory on b867172 (23.8 GB, then the OOM killer)."""
    bodies = [
        ({**STUDY, "axes": {f"model.attention_kwargs.k{i}": [1, 2] for i in range(30)}}, "30 axes; at most 8"),
        # within the schema's caps, but 64**8 cells: refused from the axes' sizes, before one cell is built
        (
            {
                **STUDY,
                "axes": {
                    path: list(range(1, 65))
                    for path in [
                        "training.batch_size",
                        "training.epochs",
                        "validation.batch_size",
                        "checkpoint.every_epochs",
                        "checkpoint.keep",
                        "lr.step_epochs",
                        "data.loader_workers",
                        "scaling.cpus_per_worker",
                    ]
                },
            },
            "more than this service's limit of 200",
        ),
    ]
    health: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with service.client(None) as client:
            while not stop.is_set():
                started = time.monotonic()
                assert client.get("/healthz").status_code == 200
                health.append(time.monotonic() - started)
                time.sleep(0.02)

    pid = os.getpid()  # the API runs in this process
    with service.client("alice") as alice:
        alice.get("/v1/studies")  # warm
        before = rss_mib(pid)
        prober = threading.Thread(target=probe)
        prober.start()
        wait_for_probes(health, 1)
        try:
            for body, text in bodies:
                started = time.monotonic()
                response = alice.post("/v1/studies", json=body)
                took = time.monotonic() - started
                assert response.status_code == 422, response.text
                assert text in str(response.json()["detail"]), response.text
                assert took < 1.0, f"{took:.2f} s"
            wait_for_probes(health, len(health) + 1)  # one more answered after the POSTs
        finally:
            stop.set()
            prober.join()
        assert max(health) < 1.0
        assert rss_mib(pid) - before < 20, f"{before:.0f} → {rss_mib(pid):.0f} MiB"
        assert alice.get("/v1/jobs").json()["total"] == 0


@pytest.mark.parametrize("key", ["mlflow.parentRunId", "san.cell", "san.seed", "MLflow.note", "san.study_id"])
def test_tags_the_service_writes_are_refused_in_jobs_and_in_a_studys_base(service, key):
    """On b867172 a job tagged ``mlflow.parentRunId`` was accepted (201) and filed under another study's run."""
    with service.client("alice") as alice:
        response = alice.post("/v1/jobs", json={**SPEC, "tracking": {"tags": {key: "x", "mine": "ok"}}})
        assert response.status_code == 422, response.text
        error = response.json()["detail"][0]
        assert error["loc"] == ["body", "tracking", "tags", key] and "set by the service" in error["msg"]
        base = {**SPEC, "tracking": {"tags": {key: "x"}}}
        response = alice.post("/v1/studies", json={**STUDY, "base": base})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "base", "tracking", "tags", key]
        assert alice.get("/v1/jobs").json()["total"] == 0


def test_each_principals_share_is_a_429_with_retry_after_that_leaves_the_others_alone(service):
    with service.client("alice") as alice, service.client("bob") as bob:
        held = alice.get("/v1/jobs", params={"status": "queued"}).json()["total"]
        ids = [alice.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(6 - held)]
        refused = alice.post("/v1/jobs", json=SPEC)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "7"
        assert "6 jobs not yet ended" in refused.json()["detail"] and "SAN_MAX_JOBS_PER_PRINCIPAL" in refused.text
        assert bob.post("/v1/jobs", json=SPEC).status_code == 201  # another principal's share is its own
        assert alice.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200  # an ended job frees its place
        assert alice.post("/v1/jobs", json=SPEC).status_code == 201

        too_big = bob.post("/v1/studies", json={**STUDY, "seeds": [0, 1, 2, 3, 4]})  # 2 cells × 5 seeds = 10 > 8
        assert too_big.status_code == 422, too_big.text
        assert too_big.json()["detail"][0]["loc"] == ["body", "seeds"] and "10 jobs" in too_big.text
        over_share = bob.post("/v1/studies", json={**STUDY, "seeds": [0, 1, 2, 3]})  # 1 held + up to 8 > 6
        assert over_share.status_code == 429 and over_share.headers["Retry-After"] == "7"
        first = bob.post("/v1/studies", json=STUDY)  # 1 held + 4 jobs
        assert first.status_code == 201, first.text
        second = bob.post("/v1/studies", json={**STUDY, "seeds": [5]})
        assert second.status_code == 429 and "SAN_MAX_STUDIES_PER_PRINCIPAL" in second.text
        refused = alice.post("/v1/studies", json={**STUDY, "seeds": [5]})  # no study yet, but 6 jobs held + 2
        assert refused.status_code == 429 and "SAN_MAX_JOBS_PER_PRINCIPAL" in refused.text
