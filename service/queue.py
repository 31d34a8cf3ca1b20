"""The service's own durable queue: Ray Jobs has none (submitted jobs contend for resources), so jobs wait in
the store as ``queued`` and at most ``max_submitted`` are on Ray at once. Each tick first reconciles the
active jobs with Ray — so a restart, or a job that ended while the API was down, shows its true state — then
submits queued jobs in order while there is room."""

import asyncio
import contextlib
import json
import logging
import threading
from pathlib import Path

from service.ray_jobs import RayJobs, RayUnavailable
from service.store import ACTIVE, Job, JobStore
from training.data.manifest import write_atomically

log = logging.getLogger("san.service")
KICK_GAP_S = 0.05


class Dispatcher:
    def __init__(self, store: JobStore, ray: RayJobs, jobs_dir: Path, max_submitted: int) -> None:
        self.store, self.ray, self.jobs_dir, self.max_submitted = store, ray, jobs_dir, max_submitted
        self._lock = threading.Lock()
        self._kick = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def spec_path(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / "spec.json"

    def tick(self) -> None:
        with self._lock:
            try:
                for job in self.store.in_states(ACTIVE):
                    self.reconcile(job)
                self.fill()
            except RayUnavailable as error:
                log.warning("queue: %s; retrying in the next tick", error)

    def reconcile(self, job: Job) -> None:
        """Bring one active job's state in line with Ray's."""
        info = self.ray.info(job.id)
        if info is None:
            if job.status == "submitted":  # claimed, then the process stopped before Ray got it: submit again
                self.submit(job)
            else:
                self.store.transition(job.id, "failed", error="Ray has no record of this job (cluster restarted?)")
        elif info.state != job.status:
            self.store.transition(job.id, info.state, error=info.message if info.state == "failed" else None)

    def fill(self) -> None:
        room = self.max_submitted - self.store.count(ACTIVE)
        if room <= 0:
            return
        for job in self.store.in_states(("queued",), limit=room):
            if job.cancel_requested:  # a cancel is under way: it must not reach Ray
                continue
            if self.store.transition(job.id, "submitted", only_from=("queued",)):  # claimed: no other dispatcher
                self.submit(job)

    def submit(self, job: Job) -> None:
        path = self.spec_path(job.id)
        write_atomically(path, lambda temp: temp.write_text(json.dumps(job.spec, indent=2)))
        try:
            self.ray.submit(job.id, path)
        except RayUnavailable:
            self.store.transition(job.id, "queued")  # back in line; the next tick tries again
            raise
        except Exception as error:  # Ray refused the job itself: it will never run
            self.store.transition(job.id, "failed", error=f"Ray refused the submission: {error}")

    def cancel(self, job: Job) -> None:
        """A queued job is cancelled here and never reaches Ray; an active one is stopped on Ray and marked
        cancelled (reconciliation agrees once Ray reports it stopped)."""
        self.store.update(job.id, cancel_requested=True)
        # Only from queued: a job read as queued may have been submitted since, and must then be stopped on Ray.
        if self.store.transition(job.id, "cancelled", only_from=("queued",)):
            return
        with self._lock:  # not while a tick is submitting it
            current = self.store.get(job.id)
            if current is not None and current.status in ACTIVE:
                self.ray.stop(job.id)
                self.store.transition(job.id, "cancelled")

    def kick(self) -> None:
        """Tick now rather than at the next interval (callable from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._kick.set)

    async def run(self, interval_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            await asyncio.to_thread(self.tick)
            await asyncio.sleep(KICK_GAP_S)  # under a burst of POSTs, one tick per gap rather than one per POST
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=interval_s)
            self._kick.clear()
