"""The service's own durable queue: Ray Jobs has none (submitted jobs contend for resources), so jobs wait in
the store as ``queued`` and at most ``max_submitted`` are on Ray at once. Each tick first reconciles the
active jobs with Ray — so a restart, or a job that ended while the API was down, shows its true state — then ends
the waiting jobs whose cancel was asked for, then submits while there is room: interrupted jobs first, then queued
jobs round-robin across principals (the one with the fewest jobs on Ray, then the one served longest ago, each
principal's jobs in their own order), so one principal's study cannot hold everyone's queue."""

import asyncio
import contextlib
import json
import logging
import threading
import time
from pathlib import Path

from service.ray_jobs import RayJobInfo, RayJobs, RayRefused, RayUnavailable, failure_path
from service.store import ACTIVE, WAITING, Job, JobStore
from training.data.manifest import write_atomically

log = logging.getLogger("san.service")
KICK_GAP_S = 0.05


class Dispatcher:
    def __init__(self, store: JobStore, ray: RayJobs, jobs_dir: Path, max_submitted: int,
                 max_interruptions: int = 3) -> None:  # fmt: skip
        self.store, self.ray, self.jobs_dir, self.max_submitted = store, ray, jobs_dir, max_submitted
        self.max_interruptions = max_interruptions
        self._lock = threading.Lock()
        self._kick = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.served: dict[str, float] = {}  # principal → when a queued job of theirs was last submitted

    def spec_path(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / "spec.json"

    def failure(self, job_id: str, info: RayJobInfo) -> str | None:
        """Why a job Ray reports failed: its entrypoint's own words when it wrote them, else Ray's message."""
        if info.state != "failed":
            return None
        with contextlib.suppress(OSError):
            return failure_path(self.spec_path(job_id)).read_text() or info.message
        return info.message

    def tick(self) -> None:
        with self._lock:
            try:
                for job in self.store.in_states(ACTIVE):
                    self.reconcile(job)
                self.end_cancelled()
                self.fill()
            except RayUnavailable as error:
                log.warning("queue: %s; retrying in the next tick", error)

    def reconcile(self, job: Job) -> None:
        """Bring one active job's state in line with Ray's (the caller holds the lock)."""
        info = self.ray.info(job.id)
        if info is None:
            ran = (running := job.at("running")) is not None and running > job.at("submitted")
            if job.status == "submitted" and not ran and job.cancel_requested:  # its owner cancelled it meanwhile
                self.store.transition(job.id, "cancelled", only_from=("submitted",))
            elif job.status == "submitted" and not ran:
                # claimed, then the process stopped before Ray got it (or Ray lost it before it ran): submit again
                self.submit(job)
            else:  # Ray answered without it: the cluster that ran it is gone (a head restarted empty)
                self.interrupt(job)
        elif info.state != job.status:
            self.store.transition(job.id, info.state, only_from=(job.status,), error=self.failure(job.id, info))

    def reconcile_now(self, job: Job) -> Job:
        """The read path's reconcile: only when no tick is at work (a tick between its claim and Ray's answer
        must not see its job reconciled, and submitted, twice), and never a submit — that is the tick's."""
        if not self._lock.acquire(blocking=False):
            return job
        try:
            current = self.store.get(job.id)
            if current is None or current.status not in ACTIVE:
                return current or job
            info = self.ray.info(current.id)
            if info is not None and info.state != current.status:
                self.store.transition(current.id, info.state, only_from=(current.status,),
                                      error=self.failure(current.id, info))  # fmt: skip
            return self.store.get(job.id) or current
        finally:
            self._lock.release()

    def interrupt(self, job: Job) -> None:
        """A job its cluster lost goes back to Ray ahead of the queue — up to ``max_interruptions`` times, then
        it fails saying so; each time the training resumes from its last checkpoint into the same MLflow run."""
        times = sum(1 for state, _ in job.transitions if state == "interrupted")
        if times >= self.max_interruptions:
            self.store.transition(job.id, "failed", only_from=(job.status,), error=f"the Ray cluster lost this job "
                                  f"{times + 1} times (SAN_MAX_INTERRUPTIONS={self.max_interruptions})")  # fmt: skip
        else:
            self.store.transition(job.id, "interrupted", only_from=(job.status,),
                                  error="the Ray cluster lost it; it resumes from its last checkpoint")  # fmt: skip

    def end_cancelled(self) -> None:
        for job_id in self.store.cancel_requested_waiting():
            self.store.transition(job_id, "cancelled", only_from=WAITING)

    def fill(self) -> None:
        room = self.max_submitted - self.store.count(ACTIVE)
        tried: set[str] = set()
        while room > 0:
            job = self.next_job()
            if job is None or job.id in tried:
                return
            tried.add(job.id)
            # Claimed (compare-and-set: no other dispatcher, and no cancel since it was read), then submitted.
            if self.store.transition(job.id, "submitted", only_from=(job.status,), unless_cancel_requested=True):
                if job.status == "queued":
                    self.served[job.principal] = time.monotonic()
                self.submit(job)
                room -= 1

    def next_job(self) -> Job | None:
        """The interrupted job that waited longest; else the head of line of the principal with the fewest jobs on
        Ray, served longest ago (never served first), oldest first among equals."""
        resumed = [job for job in self.store.in_states(("interrupted",), limit=1) if not job.cancel_requested]
        if resumed:
            return resumed[0]
        heads = self.store.queue_heads()
        if not heads:
            return None
        active = self.store.active_by_principal()
        return min(heads, key=lambda job: (active.get(job.principal, 0), self.served.get(job.principal, -1.0)))

    def submit(self, job: Job) -> None:
        path = self.spec_path(job.id)
        write_atomically(path, lambda temp: temp.write_text(json.dumps(job.spec, indent=2)))
        failure_path(path).unlink(missing_ok=True)  # an earlier attempt's reason is not this one's
        try:
            self.ray.submit(job.id, path)
        except RayUnavailable:
            # back in line (and to the state it was claimed from); the next tick tries again
            self.store.transition(job.id, "interrupted" if job.status == "interrupted" else "queued",
                                  only_from=("submitted",))  # fmt: skip
            raise
        except RayRefused as error:  # Ray refused the job itself: it will never run
            self.store.transition(job.id, "failed", only_from=("submitted",), error=f"Ray refused it: {error}")

    def cancel(self, job: Job) -> None:
        """A waiting job is cancelled here and never reaches Ray; an active one is stopped on Ray and marked
        cancelled (reconciliation agrees once Ray reports it stopped)."""
        self.store.update(job.id, cancel_requested=True)
        # Only from waiting states: a job read as queued may have been submitted since, and must then be stopped.
        if self.store.transition(job.id, "cancelled", only_from=WAITING):
            return
        with self._lock:  # not while a tick is submitting it
            current = self.store.get(job.id)
            if current is not None and current.status in WAITING:  # a failed submit put it back in line meanwhile
                self.store.transition(job.id, "cancelled", only_from=WAITING)
            elif current is not None and current.status in ACTIVE:
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
