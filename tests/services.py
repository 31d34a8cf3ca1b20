"""Real processes for the service tests: uvicorn running ``san serve``, a Ray head with dashboard, an MLflow
server and a PostgreSQL cluster — each started on a free port and stopped by PID (its own process group)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from service.auth import hash_token
from service.cli import sse_events
from service.local_ray import free_ports
from service.stack import MLFLOW_SERVER_ENV, PostgresCluster

BIN = Path(sys.executable).parent
TOKENS = {"alice": "alice-token", "bob": "bob-token"}


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(probe, timeout_s: float, what: str, interval_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not within {timeout_s:.0f} s")


def wait_for_job(client: httpx.Client, job_id: str, until, timeout_s: float = 300) -> dict:
    """The job's view once ``until`` holds: a set of states, or a predicate on the view."""
    done = until if callable(until) else lambda job: job["status"] in until
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"{job_id} still {job['status']} after {timeout_s:.0f} s")


def stop_group(process: subprocess.Popen, timeout_s: float = 30) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Service:
    """``san serve`` in a subprocess with ``SAN_*`` settings; `restart` keeps the same settings and database."""

    def __init__(self, root: Path, **settings) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tokens = "{" + ",".join(f'"{who}": "{hash_token(token)}"' for who, token in TOKENS.items()) + "}"
        self.env = {**os.environ, "SAN_TOKENS": tokens, "SAN_STORAGE_ROOT": str(root / "runs"),
                    "SAN_DATA_ROOT": str(root / "data"), "SAN_POLL_INTERVAL_S": "0.5"}  # fmt: skip
        self.env.update({f"SAN_{key.upper()}": str(value) for key, value in settings.items()})
        self.process: subprocess.Popen | None = None
        self.log = root / f"serve-{self.port}.log"

    def start(self) -> "Service":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(BIN / "san"), "serve", "--port", str(self.port)], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        wait_until(lambda: self.process.poll() is None and httpx.get(f"{self.url}/healthz").status_code == 200,
                   60, f"the service on {self.url} (log: {self.log})")  # fmt: skip
        return self

    def stop(self) -> None:
        if self.process:
            stop_group(self.process)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, who: str | None = "alice") -> httpx.Client:
        headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with open(root / "mlflow.log", "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=root,
            env={**os.environ, **MLFLOW_SERVER_ENV},
        )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 90, "mlflow server")
    return process, url


class Postgres:
    """A throwaway cluster in a temp dir on a free port, with one database ``jobs``."""

    def __init__(self) -> None:
        # Not under pytest's tmp dir: that is private to root, and the server runs as 'postgres' under root.
        self.dir = Path(tempfile.mkdtemp(prefix="san-pg-"))
        self.cluster = PostgresCluster(self.dir, free_port())

    def start(self) -> str:
        self.cluster.start()
        return self.cluster.create_database("jobs")

    def stop(self) -> None:
        self.cluster.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def read_events(service: Service, path: str, last: str | None = None, until=None) -> list[tuple[str, str, dict]]:
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
