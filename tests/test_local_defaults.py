"""Local defaults that are safe on a shared machine: the stack's PostgreSQL wants its password (also in a data dir an
earlier `up` left, trust-era ones included), and a Ray head this project starts — local mode's, a test's — has token
authentication on, with jobs still able to reach it."""

import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import psycopg
import pytest

from service.local_ray import LocalRayHead, free_ports
from service.stack import PostgresCluster
from tests.services import Service, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600, method="thread")]


@pytest.fixture
def pg_dir():
    # Not under pytest's tmp dir: that is private to root, and the server runs as 'postgres' under root.
    directory = Path(tempfile.mkdtemp(prefix="san-pg-"))
    clusters: list[PostgresCluster] = []
    yield directory, clusters
    for cluster in clusters:
        cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


def connect(port: int, password: str | None) -> None:
    with psycopg.connect(
        host="127.0.0.1", port=port, user="san", dbname="postgres", password=password, connect_timeout=10
    ) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)


def refused(port: int, password: str | None) -> str:
    with pytest.raises(psycopg.OperationalError) as error:
        connect(port, password)
    return str(error.value)


def start(pg_dir, port: int, password: str | None) -> PostgresCluster:
    directory, clusters = pg_dir
    cluster = PostgresCluster(directory, port, password)
    clusters.append(cluster)
    cluster.start()
    return cluster


def test_a_postgresql_cluster_with_a_password_refuses_connections_without_it(pg_dir, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    port = free_ports(1)[0]
    cluster = start(pg_dir, port, "first-password")
    assert "no password supplied" in refused(port, None)
    assert "password authentication failed" in refused(port, "not-the-password")
    connect(port, "first-password")
    url = cluster.create_database("jobs")
    assert url == f"postgresql+psycopg://san:first-password@127.0.0.1:{port}/jobs"
    with psycopg.connect(url.replace("+psycopg", "")) as connection:
        assert connection.execute("SELECT current_database()").fetchone() == ("jobs",)
    assert [p.name for p in pg_dir[0].iterdir() if p.name.startswith(".pwfile")] == []  # initdb's password file: gone

    cluster.stop()  # a later `up` on the same data dir comes with a new password: only it lets anyone in
    start(pg_dir, port, "second-password")
    assert "password authentication failed" in refused(port, "first-password")
    assert "no password supplied" in refused(port, None)
    connect(port, "second-password")


def test_a_data_dir_made_with_trust_auth_wants_the_password_once_started_with_one(pg_dir, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    port = free_ports(1)[0]
    trusting = start(pg_dir, port, None)  # a test's throwaway cluster, and what `up` made before passwords
    connect(port, None)
    trusting.stop()
    start(pg_dir, port, "now-a-password")
    assert "no password supplied" in refused(port, None)
    connect(port, "now-a-password")


def test_a_local_ray_head_refuses_requests_without_its_token_and_its_jobs_reach_the_cluster():
    head = LocalRayHead(*free_ports(2), num_cpus=1, token="a-token-for-this-test")
    head.start()
    try:
        version = f"{head.address}/api/version"
        assert httpx.get(version, timeout=10).status_code == 401
        assert httpx.get(version, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 403
        headers = {"Authorization": f"Bearer {head.token}"}
        assert httpx.get(version, headers=headers, timeout=10).json()["ray_version"] == "2.60.0"
        # The job's driver joins the cluster with `ray.init()` and runs a task: it found the token in the environment
        # the head's processes handed down.
        driver = 'import ray; ray.init(); print("answer", ray.get(ray.remote(lambda: 6 * 7).remote()))'
        entrypoint = shlex.join([sys.executable, "-c", driver])
        submitted = httpx.post(
            f"{head.address}/api/jobs/", json={"entrypoint": entrypoint}, headers=headers, timeout=30
        )
        assert submitted.status_code == 200, submitted.text
        job = submitted.json()["submission_id"]

        def ended() -> str | None:
            status = httpx.get(f"{head.address}/api/jobs/{job}", headers=headers, timeout=10).json()["status"]
            return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None

        status = wait_until(ended, 180, "the job")
        logs = httpx.get(f"{head.address}/api/jobs/{job}/logs", headers=headers, timeout=10).json()["logs"]
        assert status == "SUCCEEDED" and "answer 42" in logs, logs[-3000:]
    finally:
        head.stop()


def test_local_mode_starts_its_head_with_token_auth_and_uses_that_token(tmp_path):
    ray_port, dashboard_port = free_ports(2)
    service = Service(
        tmp_path,
        ray_address="local",
        local_ray_port=ray_port,
        local_ray_dashboard_port=dashboard_port,
        local_ray_cpus=1,
        max_submitted=0,
    )
    # No token configured and none saved where Ray looks: the head makes one and saves it there, readable by its
    # owner alone.
    token_file = tmp_path / "ray" / "auth_token"
    service.env.pop("RAY_AUTH_TOKEN", None)
    service.env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    service.start()
    try:
        version = f"http://127.0.0.1:{dashboard_port}/api/version"
        assert httpx.get(version, timeout=10).status_code == 401
        token = token_file.read_text().strip()
        assert len(token) == 64 and token_file.stat().st_mode & 0o777 == 0o600
        assert httpx.get(version, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
        with service.client() as alice:  # the API reaches its head with that token
            assert alice.get("/readyz").json()["checks"]["ray"] == {"status": "ok", "detail": "2.60.0"}
    finally:
        service.stop()

    ray_port, dashboard_port = free_ports(2)
    configured = Service(
        tmp_path,
        ray_address="local",
        local_ray_port=ray_port,
        local_ray_dashboard_port=dashboard_port,
        local_ray_cpus=1,
        max_submitted=0,
        ray_auth_token="a-configured-token",
    ).start()
    try:
        version = f"http://127.0.0.1:{dashboard_port}/api/version"
        assert httpx.get(version, timeout=10).status_code == 401
        answer = httpx.get(version, headers={"Authorization": "Bearer a-configured-token"}, timeout=10)
        assert answer.status_code == 200
        with configured.client() as alice:
            assert alice.get("/readyz").json()["checks"]["ray"]["status"] == "ok"
    finally:
        configured.stop()
