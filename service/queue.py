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
from datetime import UTC, datetime
from pathlib import Path

from service.estimates import HISTORY, History, schedule
from service.ray_jobs import RayJobInfo, RayJobs, RayRefused, RayUnavailable
from service.standing import MAX_RANKED, Ranking, Waiting, rank
from service.store import Job, JobStore
from training.data.manifest import write_atomically
from training.driver_report import read_report, report_path, write_report
from training.states import ACTIVE, WAITING, JobStatus

log = logging.getLogger("san.service")
KICK_GAP_S = 0.05
HISTORY_REFRESH_S = 30.0  # how often the estimates re-read the finished jobs


class Dispatcher:
    def __init__(self, store: JobStore, ray: RayJobs, jobs_dir: Path, max_submitted: int,
                 max_interruptions: int = 3) -> None:  # fmt: skip
        self.store, self.ray, self.jobs_dir, self.max_submitted = store, ray, jobs_dir, max_submitted
        self.max_interruptions = max_interruptions
        self._lock = threading.Lock()
        self._kick = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.served: dict[str, float] = {}  # principal → when a queued job of theirs was last submitted
        self.ranking = Ranking(max_submitted=max_submitted)  # the waiting jobs' order as of the last tick
        self.history, self.history_read = History(), -HISTORY_REFRESH_S  # seconds per epoch, from finished jobs
        self.specs: dict[str, dict] = {}  # waiting jobs' specs as the estimates need them (a spec never changes)

    def spec_path(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / "spec.json"

    def reported(self, job: Job, info: RayJobInfo | None) -> dict[str, str]:
        """What the job's driver reported (`training.driver_report`) that the record lacks: its MLflow run id, and —
        for a job Ray reports failed — why, in the driver's own words, else Ray's message."""
        report = read_report(report_path(self.spec_path(job.id)))
        found: dict[str, str] = {}
        if report and report.mlflow_run_id and report.mlflow_run_id != job.mlflow_run_id:
            found["mlflow_run_id"] = report.mlflow_run_id
        if info is not None and info.state == JobStatus.FAILED:
            error = (report.error if report else None) or info.message
            if error:
                found["error"] = error
        return found

    def tick(self) -> None:
        with self._lock:
            try:
                for job in self.store.in_states(ACTIVE):
                    self.reconcile(job)
                self.end_cancelled()
                self.fill()
            except RayUnavailable as error:
                log.warning("queue: %s; retrying in the next tick", error)
            self.ranking = self.rank_waiting()

    def rank_waiting(self) -> Ranking:
        """The waiting jobs in the order `fill` would submit them (reads take each job's place from here)."""
        rows = self.store.waiting(MAX_RANKED + 1)
        active = self.store.in_states(ACTIVE)
        running = [job.principal for job in active]
        waiting = [Waiting(*row) for row in rows[:MAX_RANKED]]
        order = rank(waiting, running, self.served, self.max_submitted)
        held = {principal: running.count(principal) for principal in set(running)}
        if time.monotonic() - self.history_read >= HISTORY_REFRESH_S:
            self.history, self.history_read = History(self.store.recent(JobStatus.SUCCEEDED, HISTORY)), time.monotonic()
        missing = [job.id for job in order if job.id not in self.specs]
        self.specs = {job.id: self.specs[job.id] for job in order if job.id in self.specs}  # ended ones dropped
        self.specs.update(self.store.specs_of(missing) if missing else {})
        now = datetime.now(UTC)
        durations = [(job.id, self.history.duration(self.specs[job.id])) for job in order]
        busy = [self.history.remaining(job, now) for job in active]
        estimates = schedule(durations, busy, self.max_submitted)
        return Ranking(order, held, self.max_submitted, len(rows) <= MAX_RANKED, estimates, self.history, now)

    def reconcile(self, job: Job) -> None:
        """Bring one active job's record in line with Ray's state and its driver's report (the caller holds the
        lock). The only place a job's state follows Ray: reads return the record as stored."""
        info = self.ray.info(job.id)
        if info is None:
            ran = (running := job.at(JobStatus.RUNNING)) is not None and running > job.at(JobStatus.SUBMITTED)
            if job.status == JobStatus.SUBMITTED and not ran and job.cancel_requested:  # cancelled meanwhile
                self.store.transition(job.id, JobStatus.CANCELLED, only_from=(JobStatus.SUBMITTED,))
            elif job.status == JobStatus.SUBMITTED and not ran:
                # claimed, then the process stopped before Ray got it (or Ray lost it before it ran): submit again
                self.submit(job)
            else:  # Ray answered without it: the cluster that ran it is gone (a head restarted empty)
                self.interrupt(job)
            return
        reported = self.reported(job, info)
        if info.state != job.status:
            self.store.transition(job.id, info.state, only_from=(job.status,), **reported)
            if info.state == JobStatus.SUCCEEDED:
                self.history_read = -HISTORY_REFRESH_S  # the estimates learn from it at once
        elif "mlflow_run_id" in reported:
            self.store.update(job.id, mlflow_run_id=reported["mlflow_run_id"])

    def interrupt(self, job: Job) -> None:
        """A job its cluster lost goes back to Ray ahead of the queue — up to ``max_interruptions`` times, then
        it fails saying so; each time the training resumes from its last checkpoint into the same MLflow run."""
        times = sum(1 for state, _ in job.transitions if state == JobStatus.INTERRUPTED)
        if times >= self.max_interruptions:
            error = f"the Ray cluster lost this job {times + 1} times (SAN_MAX_INTERRUPTIONS={self.max_interruptions})"
            self.store.transition(job.id, JobStatus.FAILED, only_from=(job.status,), error=error)
        else:
            error = "the Ray cluster lost it; it resumes from its last checkpoint"
            self.store.transition(job.id, JobStatus.INTERRUPTED, only_from=(job.status,), error=error)

    def end_cancelled(self) -> None:
        for job_id in self.store.cancel_requested_waiting():
            self.store.transition(job_id, JobStatus.CANCELLED, only_from=WAITING)

    def fill(self) -> None:
        room = self.max_submitted - self.store.count(ACTIVE)
        tried: set[str] = set()
        while room > 0:
            job = self.next_job()
            if job is None or job.id in tried:
                return
            tried.add(job.id)
            # Claimed (compare-and-set: no other dispatcher, and no cancel since it was read), then submitted.
            claimed = self.store.transition(
                job.id, JobStatus.SUBMITTED, only_from=(job.status,), unless_cancel_requested=True
            )
            if claimed:
                if job.status == JobStatus.QUEUED:
                    self.served[job.principal] = time.monotonic()
                self.submit(job)
                room -= 1

    def next_job(self) -> Job | None:
        """The interrupted job that waited longest; else the head of line of the principal with the fewest jobs on
        Ray, served longest ago (never served first), oldest first among equals."""
        resumed = [job for job in self.store.in_states((JobStatus.INTERRUPTED,), limit=1) if not job.cancel_requested]
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
        report = read_report(report_path(path))
        if report and report.error:  # an earlier attempt's reason is not this one's; its MLflow run id still is
            write_report(report_path(path), error=None)
        try:
            self.ray.submit(job.id, path, report_path(path))
        except RayUnavailable:
            # back in line (and to the state it was claimed from); the next tick tries again
            back = JobStatus.INTERRUPTED if job.status == JobStatus.INTERRUPTED else JobStatus.QUEUED
            self.store.transition(job.id, back, only_from=(JobStatus.SUBMITTED,))
            raise
        except RayRefused as error:  # Ray refused the job itself: it will never run
            error = f"Ray refused it: {error}"
            self.store.transition(job.id, JobStatus.FAILED, only_from=(JobStatus.SUBMITTED,), error=error)

    def cancel(self, job: Job) -> bool:
        """A waiting job is cancelled here and never reaches Ray; an active one is reconciled (it may have ended
        meanwhile), then stopped on Ray and marked cancelled. True when this call ended the job."""
        self.store.update(job.id, cancel_requested=True)
        # Only from waiting states: a job read as queued may have been submitted since, and must then be stopped.
        if self.store.transition(job.id, JobStatus.CANCELLED, only_from=WAITING):
            return True
        with self._lock:  # not while a tick is submitting it
            current = self.store.get(job.id)
            if current is not None and current.status in ACTIVE:
                self.reconcile(current)
                current = self.store.get(job.id)
            if current is None or current.status.is_terminal():
                return current is not None and current.status == JobStatus.CANCELLED
            if current.status in WAITING:  # a failed submit (or an interruption) put it back in line meanwhile
                return self.store.transition(job.id, JobStatus.CANCELLED, only_from=WAITING)
            self.ray.stop(job.id)
            return self.store.transition(job.id, JobStatus.CANCELLED)

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
