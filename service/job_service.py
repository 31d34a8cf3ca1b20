"""What the service does with jobs — admit and store, list, show, cancel, logs, metrics — for the routes, which only
translate HTTP. Reads return the record as stored (the dispatcher's loop alone reconciles it with Ray and with the
driver's report) plus what the job's MLflow run says, read only."""

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any, TypeVar

from service.admission import AdmissionUnavailable, ModelRefused, ModelSizes
from service.errors import Conflict, Invalid, NotFound, Unavailable, value_error
from service.progress import Latest, RunReader
from service.queue import Dispatcher
from service.ray_jobs import RayJobs, RayUnavailable
from service.schemas import EpochMetrics, JobView, Progress, Transition
from service.settings import ServiceSettings
from service.standing import standing
from service.store import GroupCommit, IdempotencyConflict, Job, JobStore
from service.validation import ClusterSize, JobShares, Rejected, admit
from training.config import JobSpec
from training.states import JobStatus

T = TypeVar("T")
log = logging.getLogger("san.service")
ADMISSION_RETRY_AFTER = {"Retry-After": "5"}


def summary(job: Job) -> JobView:
    return JobView(
        id=job.id,
        status=job.status,
        spec=job.spec,
        created_at=job.created_at,
        updated_at=job.updated_at,
        transitions=[Transition(status=s, at=a) for s, a in job.transitions],
        ray_submission_id=job.id if job.reached_ray else None,
        cancel_requested=job.cancel_requested,
        error=job.error,
        mlflow_run_id=job.mlflow_run_id,
    )


def progress_of(job: Job, latest: Latest, now: datetime) -> Progress:
    """Epoch k of N, and for a running job the time left at its pace since its last (re)start: epochs run before an
    interruption took none of that time (counting them made the ETA too low after a resume)."""
    progress = Progress(epoch=latest.epochs, epochs=job.spec["training"]["epochs"], eta_s=None)
    running_since = job.at(JobStatus.RUNNING)
    if job.status == JobStatus.RUNNING and running_since and latest.epochs_since:
        elapsed = (now - running_since).total_seconds()
        progress.eta_s = elapsed / latest.epochs_since * (progress.epochs - latest.epochs)
    return progress


class JobService:
    def __init__(
        self,
        settings: ServiceSettings,
        store: JobStore,
        new_jobs: GroupCommit,
        dispatcher: Dispatcher,
        ray: RayJobs,
        runs: RunReader,
        shares: JobShares,
        cluster: ClusterSize,
        model_sizes: ModelSizes,
        admission_threads: Executor,
    ) -> None:
        self.settings, self.store, self.new_jobs, self.dispatcher = settings, store, new_jobs, dispatcher
        self.ray, self.runs, self.shares, self.cluster = ray, runs, shares, cluster
        self.model_sizes, self.admission_threads = model_sizes, admission_threads

    async def stored(self, call: Callable[..., T], *args: Any) -> T:
        """A store call from the event loop: there for a local SQLite file (microseconds; a thread hop costs more),
        in a thread for PostgreSQL, whose network round trips must not hold every other request."""
        if self.store.local:
            return call(*args)
        return await asyncio.to_thread(call, *args)

    async def submit(self, principal: str, spec: JobSpec, idempotency_key: str | None) -> tuple[Job, bool]:
        """The job stored (created: True) or, for an Idempotency-Key used before with this spec, the job it made.
        A principal past its share gets `TooMany` before any check is made."""
        async with self.shares.reserve_on_loop(principal, 1):
            try:
                key = spec.model_key()  # counted in the admission worker, once per model; a thread hop only then
                params = self.model_sizes.known(key) or await asyncio.get_running_loop().run_in_executor(
                    self.admission_threads, self.model_sizes.params, key
                )
            except ModelRefused as error:  # located as the spec's own validation locates it
                raise value_error(str(error)) from None
            except AdmissionUnavailable as error:
                raise Unavailable(f"checking the model: {error}", ADMISSION_RETRY_AFTER) from None
            try:
                admitted = admit(spec, self.settings, self.cluster.value, params=params)
            except Rejected as error:
                raise Invalid(error.detail()) from None
            try:
                # On the event loop, not in a thread: handing the write to the threadpool made each POST wait for
                # the GIL behind the loop (p99 188 ms vs 101 ms at 50 clients). A SQLite commit in WAL mode does not
                # fsync.
                job, created = await self.new_jobs.create(principal, admitted.model_dump(mode="json"), idempotency_key)
            except IdempotencyConflict as error:
                raise Conflict(str(error)) from None
        if created:
            self.dispatcher.kick()
        return job, created

    def summary(self, job: Job) -> JobView:
        """The stored record, and for a job not running yet its place in the queue and why it waits."""
        view = summary(job)
        view.queue = standing(
            job.id, job.principal, job.status, job.spec, self.dispatcher.ranking, self.cluster.value, self.cluster.free
        )
        return view

    async def page(self, principal: str, status: JobStatus | None, limit: int, offset: int) -> tuple[list[Job], int]:
        return await self.stored(self.store.page, principal, status, limit, offset)

    def owned(self, job_id: str, principal: str) -> Job:
        job = self.store.get(job_id, principal)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    async def view(self, job_id: str, principal: str) -> JobView:
        """The stored record, with its progress and latest metrics from its MLflow run once it has one."""
        job = await self.stored(self.owned, job_id, principal)
        view = self.summary(job)
        if job.mlflow_run_id is None:
            return view
        uri = job.spec["tracking"]["mlflow_uri"]
        try:
            latest = await asyncio.to_thread(self.runs.latest, uri, job.mlflow_run_id, job.at(JobStatus.RUNNING))
        except Exception as error:  # MLflow down: the view goes without its progress
            log.warning("mlflow for %s: %s", job.id, error)
            return view
        view.progress = progress_of(job, latest, datetime.now(UTC))
        view.metrics = latest.metrics
        ui = self.settings.mlflow_ui_url  # only where the operator configured where users see MLflow
        if ui:
            view.mlflow_url = f"{ui.rstrip('/')}/#/experiments/{latest.experiment_id}/runs/{job.mlflow_run_id}"
        return view

    def cancel(self, job_id: str, principal: str) -> Job:
        """A waiting job is cancelled without reaching Ray; one on Ray is stopped there."""
        job = self.owned(job_id, principal)
        if job.status.is_terminal():
            raise Conflict(f"job {job_id} already ended: {job.status}")
        try:
            ended = self.dispatcher.cancel(job)
        except RayUnavailable as error:
            raise Unavailable(f"cannot reach Ray to stop the job: {error}") from None
        current = self.store.get(job_id) or job
        if not ended and current.status.is_terminal():  # it ended on Ray before the stop reached it
            raise Conflict(f"job {job_id} already ended: {current.status}")
        if ended:
            self.shares.release(principal, 1)
        return current

    def logs(self, job_id: str, principal: str, tail: int) -> str:
        """The driver log's last ``tail`` lines (empty for a job that never reached Ray)."""
        job = self.owned(job_id, principal)
        if not job.reached_ray:
            return ""
        try:
            text = self.ray.logs(job.id, tail)
        except RayUnavailable as error:
            raise Unavailable(f"cannot reach Ray for the logs: {error}") from None
        return "\n".join(text.splitlines()[-tail:]) + "\n" if text else ""

    def metrics(self, job_id: str, principal: str) -> EpochMetrics:
        job = self.owned(job_id, principal)
        if job.mlflow_run_id is None:
            return EpochMetrics(job_id=job.id, mlflow_run_id=None, epochs=[])
        try:
            epochs = self.runs.history(job.spec["tracking"]["mlflow_uri"], job.mlflow_run_id)
        except Exception as error:
            raise Unavailable(f"cannot read the MLflow run {job.mlflow_run_id}: {error}") from None
        return EpochMetrics(job_id=job.id, mlflow_run_id=job.mlflow_run_id, epochs=epochs)
