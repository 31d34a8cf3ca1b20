"""The service's side of the Ray Jobs API: submit ``python -m training.run`` with the job's id as submission id,
read status and logs, stop; and, in local mode, a Ray head with dashboard that this process starts and stops
by PID (never ``ray stop``, which would end every Ray process on the machine)."""

import contextlib
import os
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
from ray.job_submission import JobStatus, JobSubmissionClient

RAY_STATES = {  # Ray's job status → the service's state
    JobStatus.PENDING: "submitted",
    JobStatus.RUNNING: "running",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "cancelled",
}


class RayUnavailable(RuntimeError):
    """The cluster did not answer (not a rejection of the job)."""


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
    def __init__(self, address: str, token: str | None, python: str, env_vars: dict[str, str]) -> None:
        self.address = address.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.python, self.env_vars = python, env_vars
        self._client: JobSubmissionClient | None = None
        self.http = httpx.Client(base_url=self.address, headers=self.headers, timeout=5)  # reused: no setup per call

    def close(self) -> None:
        self.http.close()

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:
            try:
                self._client = JobSubmissionClient(self.address, headers=self.headers)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise RayUnavailable(f"Ray at {self.address}: {error}") from None
        return self._client

    def entrypoint(self, spec_path: Path, job_id: str) -> str:
        return shlex.join([self.python, "-m", "training.run", str(spec_path), "--job-id", job_id])

    def submit(self, job_id: str, spec_path: Path) -> None:
        """Submit once: a submission id Ray already holds (a retry after a crash) counts as submitted."""
        try:
            self.client.submit_job(entrypoint=self.entrypoint(spec_path, job_id), submission_id=job_id,
                                   runtime_env={"env_vars": self.env_vars})  # fmt: skip
        except RuntimeError as error:
            if "already exists" in str(error):
                return
            raise self._unavailable_or(error) from None

    def info(self, job_id: str) -> RayJobInfo | None:
        """The job's state as the service names it, or None when Ray has no such submission."""
        try:
            details = self.client.get_job_info(job_id)
        except RuntimeError as error:
            if "does not exist" in str(error):
                return None
            raise self._unavailable_or(error) from None
        return RayJobInfo(RAY_STATES[details.status], details.message)

    def stop(self, job_id: str) -> None:
        try:
            self.client.stop_job(job_id)
        except RuntimeError as error:
            if "does not exist" not in str(error):
                raise self._unavailable_or(error) from None

    def logs(self, job_id: str) -> str:
        try:
            return self.client.get_job_logs(job_id)
        except RuntimeError as error:
            if "does not exist" in str(error):
                return ""
            raise self._unavailable_or(error) from None

    def resources(self) -> dict[str, float]:
        """CPUs and GPUs of the cluster's live nodes (the dashboard's state API)."""
        try:
            response = self.http.get("/api/v0/nodes", params={"detail": 1})
            response.raise_for_status()
        except httpx.HTTPError as error:
            raise RayUnavailable(f"Ray at {self.address}: {error}") from None
        totals = {"CPU": 0.0, "GPU": 0.0}
        for node in response.json()["data"]["result"]["result"]:
            if node["state"] == "ALIVE":
                for key in totals:
                    totals[key] += node["resources_total"].get(key, 0.0)
        return totals

    def ping(self) -> str:
        """The cluster's Ray version; raises RayUnavailable."""
        try:
            response = self.http.get("/api/version")
            response.raise_for_status()
        except httpx.HTTPError as error:
            raise RayUnavailable(f"Ray at {self.address}: {error}") from None
        return response.json().get("ray_version", "unknown")

    def _unavailable_or(self, error: Exception) -> Exception:
        text = str(error)
        if "Failed to connect" in text or "Connection" in text or "status code 5" in text:
            self._client = None  # reconnect next time
            return RayUnavailable(text.splitlines()[0])
        return error


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


class LocalRayHead:
    """``ray start --head --block`` with the dashboard, in its own process group, so stopping it ends exactly the
    processes it started. Its temp dir is short and private: Ray's socket paths have a length limit."""

    def __init__(self, port: int, dashboard_port: int, num_cpus: int | None, env: dict[str, str] | None = None) -> None:
        self.port, self.dashboard_port, self.num_cpus, self.env = port, dashboard_port, num_cpus, env
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
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray head exited with {self.process.returncode}; see {log.name}")
            try:
                if httpx.get(f"{self.address}/api/version", timeout=2).status_code in (200, 401):
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
