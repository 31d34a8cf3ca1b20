"""The service's side of the Ray Jobs API: submit ``python -m training.run`` with the job's id as submission id,
read status and logs, stop; and, in local mode, a Ray head with dashboard that this process starts and stops
by PID (never ``ray stop``, which would end every Ray process on the machine)."""

import contextlib
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

RAY_STATES = {  # Ray's job status → the service's state
    "PENDING": "submitted",
    "RUNNING": "running",
    "SUCCEEDED": "succeeded",
    "FAILED": "failed",
    "STOPPED": "cancelled",
}


MAX_LOG_BYTES = 4 * 1024 * 1024  # of a log tail the API passes on: the newest
MAX_LOG_READ_BYTES = 64 * 1024 * 1024  # of a tail read from Ray (100,000 lines of very long ones)


class RayUnavailable(RuntimeError):
    """The cluster did not answer (not a rejection of the job)."""


class RayRefused(RuntimeError):
    """The cluster answered and refused the request (HTTP 4xx): retrying will not help."""


def failure_path(spec_path: Path) -> Path:
    """Where the job's entrypoint writes why it failed: beside its spec, on storage the API and the cluster share."""
    return spec_path.with_name("failure.txt")


@dataclass(frozen=True)
class RayJobInfo:
    state: str
    message: str | None


def auth_token(configured: str | None) -> str | None:
    """The cluster token: configured, else ``$RAY_AUTH_TOKEN``, else the file Ray's own clients read."""
    if configured:
        return configured
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.is_file() else None


class RayJobs:
    """The Ray Jobs REST API of a head's dashboard, over plain HTTP: each answer is told apart by its status code
    (200, 404 no such job, other 4xx a refusal, 5xx or no answer: unavailable), never by its text; and the API
    process imports no Ray for it."""

    def __init__(self, address: str, token: str | None, python: str, env_vars: dict[str, str]) -> None:
        self.address = address.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.python, self.env_vars = python, env_vars
        self.http = httpx.Client(base_url=self.address, headers=self.headers, timeout=10)  # reused: no setup per call

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response | None:
        """The answer, or None for 404; `RayUnavailable` for no answer or a 5xx, `RayRefused` for another 4xx."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise RayUnavailable(f"Ray at {self.address}: {error}") from None
        if response.status_code == 404:
            return None
        if response.status_code >= 500:
            raise RayUnavailable(f"Ray at {self.address}: HTTP {response.status_code} on {method} {path}")
        if response.status_code >= 400:
            first = response.text.strip().splitlines()[-1:] or [""]
            raise RayRefused(f"HTTP {response.status_code} on {method} {path}: {first[0][:500]}")
        return response

    def entrypoint(self, spec_path: Path, job_id: str) -> str:
        return shlex.join([self.python, "-m", "training.run", str(spec_path), "--job-id", job_id,
                           "--failure-file", str(failure_path(spec_path))])  # fmt: skip

    def submit(self, job_id: str, spec_path: Path) -> None:
        """Submit once: a submission id Ray already holds (a retry after a crash) counts as submitted."""
        body = {"entrypoint": self.entrypoint(spec_path, job_id), "submission_id": job_id,
                "runtime_env": {"env_vars": self.env_vars}}  # fmt: skip
        try:
            self.request("POST", "/api/jobs/", json=body)
        except (RayRefused, RayUnavailable):
            # A submission id Ray already holds is answered with an error like any other (Ray 2.60: a 500 from its
            # job agent); asked again by id, it is a job Ray knows.
            with contextlib.suppress(RayUnavailable):
                if self.info(job_id) is not None:
                    return
            raise

    def info(self, job_id: str) -> RayJobInfo | None:
        """The job's state as the service names it, or None when Ray has no such submission."""
        response = self.request("GET", f"/api/jobs/{job_id}")
        if response is None:
            return None
        details = response.json()
        return RayJobInfo(RAY_STATES[details["status"]], details.get("message"))

    def stop(self, job_id: str) -> None:
        self.request("POST", f"/api/jobs/{job_id}/stop")

    def logs(self, job_id: str, tail: int) -> str:
        """The driver log's last ``tail`` lines, read from the file's end by Ray's state API on the driver's node (the
        Jobs API's ``/logs`` answers the whole log), at most `MAX_LOG_BYTES`; empty when Ray has no such job or no
        log for it yet."""
        found = self.request("GET", f"/api/jobs/{job_id}")
        node = found.json().get("driver_node_id") if found is not None else None
        if not node:
            return ""
        params = {"node_id": node, "filename": f"job-driver-{job_id}.log", "lines": tail}
        chunks: list[bytes] = []
        try:
            with self.http.stream("GET", "/api/v0/logs/file", params=params) as response:
                if response.status_code >= 400:  # the cluster answered above: the file is not there (yet)
                    return ""
                kept = read = 0
                for chunk in response.iter_bytes():  # oldest first: keep the newest MAX_LOG_BYTES
                    chunks.append(chunk)
                    kept, read = kept + len(chunk), read + len(chunk)
                    while kept - len(chunks[0]) >= MAX_LOG_BYTES:
                        kept -= len(chunks.pop(0))
                    if read >= MAX_LOG_READ_BYTES:
                        break
        except httpx.HTTPError as error:
            raise RayUnavailable(f"Ray at {self.address}: {error}") from None
        return b"".join(chunks)[-MAX_LOG_BYTES:].decode(errors="replace")

    def resources(self) -> dict[str, float]:
        """CPUs and GPUs of the cluster's live nodes (the dashboard's state API)."""
        response = self.request("GET", "/api/v0/nodes", params={"detail": 1})
        if response is None:
            raise RayUnavailable(f"Ray at {self.address}: no state API")
        totals = {"CPU": 0.0, "GPU": 0.0}
        for node in response.json()["data"]["result"]["result"]:
            if node["state"] == "ALIVE":
                for key in totals:
                    totals[key] += node["resources_total"].get(key, 0.0)
        return totals

    def ping(self) -> str:
        """The cluster's Ray version; raises RayUnavailable."""
        response = self.request("GET", "/api/version")
        if response is None:
            raise RayUnavailable(f"Ray at {self.address}: no /api/version")
        return response.json().get("ray_version", "unknown")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports no process listens on now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def saved_auth_token() -> str:
    """A new cluster token, saved 0600 where Ray's own clients on this machine read one (as Ray's first ``ray.init``
    saves its own), unless another process saved one there first: then that one."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=".auth_token.")  # created 0600
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(token)
        os.link(temp, path)  # whole or not at all, and never over a token that is there
    except FileExistsError:
        token = path.read_text().strip()
    finally:
        os.unlink(temp)
    return token


class LocalRayHead:
    """``ray start --head --block`` with the dashboard, in its own process group, so stopping it ends exactly the
    processes it started. Its temp dir is short and private: Ray's socket paths have a length limit.

    Token authentication is always on (``RAY_AUTH_MODE=token``: Ray 2.60's ``ray start`` turns it on only when it
    finds a token). The token: ``token``, else ``RAY_AUTH_TOKEN`` of ``env``, else the one Ray's clients on this
    machine use (`auth_token`), else a new one saved where they look (`saved_auth_token`); it is ``self.token``."""

    def __init__(
        self,
        port: int,
        dashboard_port: int,
        num_cpus: int | None,
        env: dict[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self.port, self.dashboard_port, self.num_cpus = port, dashboard_port, num_cpus
        env = dict(os.environ if env is None else env)
        self.token = token or env.get("RAY_AUTH_TOKEN") or auth_token(None) or saved_auth_token()
        # The head's processes pass their environment on to the job supervisors and drivers they start: a job's
        # `ray.init()` finds the token there.
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.process: subprocess.Popen | None = None
        self.temp_dir = tempfile.mkdtemp(prefix="san-ray-")

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 90) -> None:
        ray = Path(sys.executable).parent / "ray"  # the venv's, beside the interpreter
        command = [str(ray) if ray.exists() else "ray", "start", "--head", "--block", "--disable-usage-stats",
                   f"--port={self.port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}"]  # fmt: skip
        # The dashboard agent's HTTP port is fixed by default (52365): a second cluster on this machine (a `san train`
        # run's, a test's) finds it taken and its job submissions hang. A free port, asked of the OS, instead. Only
        # that one: Ray picks the other agents' ports itself, and each port picked here can be taken before Ray binds
        # it (a runtime-env agent given one that was lost that race, and the head died).
        command.append(f"--dashboard-agent-listen-port={free_ports(1)[0]}")
        if self.num_cpus:
            command.append(f"--num-cpus={self.num_cpus}")
        log = open(Path(self.temp_dir) / "head.log", "wb")  # noqa: SIM115 - the head outlives this call
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.token}"}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray head exited with {self.process.returncode}; see {log.name}")
            try:
                if httpx.get(f"{self.address}/api/version", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ray head not answering at {self.address} after {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM to ``ray start`` alone — it ends its own processes in order (a group-wide SIGTERM leaves it
        waiting) — then SIGKILL to whatever of the group is left."""
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
