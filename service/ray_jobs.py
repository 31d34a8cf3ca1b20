"""The service's side of the Ray Jobs API: submit ``python -m training.run`` with the job's id as submission id,
read status and logs, stop (a Ray head this process starts itself: `service.local_ray`)."""

import contextlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import httpx

from training.states import JobStatus

MAX_LOG_BYTES = 4 * 1024 * 1024  # of a log tail the API passes on: the newest
MAX_LOG_READ_BYTES = 64 * 1024 * 1024  # of a tail read from Ray (100,000 lines of very long ones)


class RayUnavailable(RuntimeError):
    """The cluster did not answer (not a rejection of the job)."""


class RayRefused(RuntimeError):
    """The cluster answered and refused the request (HTTP 4xx): retrying will not help."""


@dataclass(frozen=True)
class RayJobInfo:
    state: JobStatus
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

    def entrypoint(self, spec_path: Path, job_id: str, report: Path) -> str:
        # --admitted: the spec was validated at admission, once; the driver and its workers read it back as it is
        command = [
            self.python,
            "-m",
            "training.run",
            str(spec_path),
            "--job-id",
            job_id,
            "--report-file",
            str(report),
            "--admitted",
        ]
        return shlex.join(command)

    def submit(self, job_id: str, spec_path: Path, report: Path) -> None:
        """Submit once: a submission id Ray already holds (a retry after a crash) counts as submitted. ``report``:
        where the driver reports its MLflow run id and why it failed (`training.driver_report`)."""
        body = {"entrypoint": self.entrypoint(spec_path, job_id, report), "submission_id": job_id,
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
        return RayJobInfo(JobStatus.from_ray(details["status"]), details.get("message"))

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

    def free(self) -> dict[str, float] | None:
        """CPUs and GPUs free on the cluster now (the autoscaler's load report), None where Ray does not say."""
        response = self.request("GET", "/api/cluster_status", params={"format": 0})
        if response is None:
            return None
        try:
            usage = response.json()["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
        except (KeyError, TypeError, ValueError):
            return None
        return {key: max(0.0, total - used) for key in ("CPU", "GPU") for used, total in [usage.get(key, (0.0, 0.0))]}

    def ping(self) -> str:
        """The cluster's Ray version; raises RayUnavailable."""
        response = self.request("GET", "/api/version")
        if response is None:
            raise RayUnavailable(f"Ray at {self.address}: no /api/version")
        return response.json().get("ray_version", "unknown")
