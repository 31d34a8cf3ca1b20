"""``/v1/jobs``: submit, list, show, cancel, logs and per-epoch metrics. Another principal's job is a 404."""

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from service.admission import AdmissionUnavailable, ModelRefused
from service.auth import Principal
from service.progress import Latest
from service.ray_jobs import RayUnavailable
from service.store import ACTIVE, TERMINAL, IdempotencyConflict, Job, State
from service.validation import Rejected, admit
from training.config import JobSpec, default_experiment

T = TypeVar("T")

log = logging.getLogger("san.service")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class Transition(BaseModel):
    status: str
    at: datetime


class Progress(BaseModel):
    epoch: int  # epochs finished
    epochs: int
    eta_s: float | None


class JobView(BaseModel):
    id: str
    status: str
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    transitions: list[Transition]
    ray_submission_id: str | None  # the job id, once the job reached Ray
    cancel_requested: bool
    error: str | None
    mlflow_run_id: str | None = None
    mlflow_url: str | None = None
    progress: Progress | None = None
    metrics: dict[str, float] = {}


class JobList(BaseModel):
    items: list[JobView]
    total: int
    limit: int
    offset: int


class EpochMetrics(BaseModel):
    job_id: str
    mlflow_run_id: str | None
    epochs: list[dict[str, Any]]


def summary(job: Job) -> JobView:
    return JobView(id=job.id, status=job.status, spec=job.spec, created_at=job.created_at, updated_at=job.updated_at,
                   transitions=[Transition(status=s, at=a) for s, a in job.transitions],
                   ray_submission_id=job.id if job.reached_ray else None, cancel_requested=job.cancel_requested,
                   error=job.error, mlflow_run_id=job.mlflow_run_id)  # fmt: skip


async def stored(request: Request, call: Callable[..., T], *args: Any) -> T:
    """A store call from an async route: on the event loop for a local SQLite file (microseconds; a thread hop
    costs more), in a thread for PostgreSQL, whose network round trips must not hold every other request."""
    if request.app.state.store.local:
        return call(*args)
    return await asyncio.to_thread(call, *args)


def unavailable(message: str) -> HTTPException:
    """503 for the admission worker's failure to answer (not a verdict on the request)."""
    return HTTPException(503, detail=message, headers={"Retry-After": "5"})


def owned(request: Request, job_id: str, principal: str) -> Job:
    job = request.app.state.store.get(job_id, principal)
    if job is None:
        raise HTTPException(404, detail=f"no job {job_id!r}")
    return job


def reconciled(request: Request, job: Job) -> Job:
    """The job with its state checked against Ray (on read, as on startup)."""
    if job.status in ACTIVE:
        try:
            return request.app.state.dispatcher.reconcile_now(job)
        except RayUnavailable as error:
            log.warning("reconcile %s: %s", job.id, error)
    return job


def run_id(request: Request, job: Job) -> str | None:
    """The job's MLflow run (found by its tag in the job's own experiment once the driver created it, then
    remembered); MLflow is never asked about a job that never reached Ray."""
    if job.mlflow_run_id or not job.reached_ray or job.status == "submitted":
        return job.mlflow_run_id
    tracking = job.spec["tracking"]
    experiment = tracking.get("experiment") or default_experiment(job.spec["data"]["dataset"])
    try:
        found = request.app.state.runs.find_run(tracking["mlflow_uri"], job.id, experiment, job.status in TERMINAL)
    except Exception as error:  # MLflow down: the view goes without its run
        log.warning("mlflow for %s: %s", job.id, error)
        return None
    if found:
        request.app.state.store.update(job.id, mlflow_run_id=found)
    return found


def progress_of(job: Job, latest: Latest, now: datetime) -> Progress:
    """Epoch k of N, and for a running job the time left at its pace since its last (re)start: epochs run before an
    interruption took none of that time (counting them made the ETA too low after a resume)."""
    progress = Progress(epoch=latest.epochs, epochs=job.spec["training"]["epochs"], eta_s=None)
    running_since = job.at("running")
    if job.status == "running" and running_since and latest.epochs_since:
        elapsed = (now - running_since).total_seconds()
        progress.eta_s = elapsed / latest.epochs_since * (progress.epochs - latest.epochs)
    return progress


def detailed(request: Request, job: Job) -> JobView:
    view = summary(job)
    view.mlflow_run_id = run_id(request, job)
    if view.mlflow_run_id is None:
        return view
    uri = job.spec["tracking"]["mlflow_uri"]
    running_since = job.at("running")
    try:
        latest = request.app.state.runs.latest(uri, view.mlflow_run_id, since=running_since)
    except Exception as error:
        log.warning("mlflow for %s: %s", job.id, error)
        return view
    view.progress = progress_of(job, latest, datetime.now(UTC))
    view.metrics = latest.metrics
    ui = request.app.state.settings.mlflow_ui_url  # only where the operator configured where users see MLflow
    if ui:
        view.mlflow_url = f"{ui.rstrip('/')}/#/experiments/{latest.experiment_id}/runs/{view.mlflow_run_id}"
    return view


@router.post("", status_code=201, response_model=JobView)
async def submit_job(
    spec: JobSpec,
    request: Request,
    response: Response,
    principal: Principal,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobView:
    """Queue a training job. With an ``Idempotency-Key`` header a retry returns the job the first call made
    (200 instead of 201); the same key with a different spec is a 409; a principal at its share of jobs not yet
    ended gets a 429 with ``Retry-After``."""
    state = request.app.state
    async with state.shares.reserve_on_loop(principal, 1):  # first: a principal past its share costs no check
        try:
            key = spec.model_key()  # counted in the admission worker, once per model; a thread hop only then
            params = state.model_sizes.known(key) or await asyncio.get_running_loop().run_in_executor(
                state.admission_threads, state.model_sizes.params, key
            )
        except ModelRefused as error:  # located as the spec's own validation locates it
            detail = [{"loc": ["body"], "msg": f"Value error, {error}", "type": "value_error"}]
            raise HTTPException(422, detail=detail) from None
        except AdmissionUnavailable as error:
            raise unavailable(f"checking the model: {error}") from None
        try:
            admitted = admit(spec, state.settings, state.cluster.value, params=params)
        except Rejected as error:
            raise HTTPException(422, detail=error.detail()) from None
        try:
            # On the event loop, not in a thread: handing the write to the threadpool made each POST wait for the GIL
            # behind the loop (p99 188 ms vs 101 ms at 50 clients). A local SQLite commit in WAL mode does not fsync.
            job, created = await state.new_jobs.create(principal, admitted.model_dump(mode="json"), idempotency_key)
        except IdempotencyConflict as error:
            raise HTTPException(409, detail=str(error)) from None
    if created:
        state.dispatcher.kick()
    else:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return summary(job)


@router.get("", response_model=JobList)
async def list_jobs(
    request: Request,
    principal: Principal,
    status: State | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> JobList:
    """This principal's jobs, newest first."""
    jobs, total = await stored(request, request.app.state.store.page, principal, status, limit, offset)
    return JobList(items=[summary(job) for job in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobView)
async def show_job(job_id: str, request: Request, principal: Principal) -> JobView:
    """Status, progress (epoch k of N, ETA), latest metrics, the MLflow run and its link, timestamps, error."""
    job = await stored(request, owned, request, job_id, principal)
    if job.status == "queued":
        return summary(job)
    return await run_in_threadpool(lambda: detailed(request, reconciled(request, job)))  # Ray and MLflow calls


@router.post("/{job_id}/cancel", response_model=JobView)
def cancel_job(job_id: str, request: Request, principal: Principal) -> JobView:
    """A queued job is cancelled without reaching Ray; a submitted or running one is stopped on Ray."""
    job = reconciled(request, owned(request, job_id, principal))
    if job.status in TERMINAL:
        raise HTTPException(409, detail=f"job {job_id} already ended: {job.status}")
    try:
        request.app.state.dispatcher.cancel(job)
    except RayUnavailable as error:
        raise HTTPException(503, detail=f"cannot reach Ray to stop the job: {error}") from None
    request.app.state.shares.release(principal, 1)
    return summary(request.app.state.store.get(job_id) or job)


@router.get("/{job_id}/logs", response_class=PlainTextResponse)
def job_logs(
    job_id: str, request: Request, principal: Principal, tail: Annotated[int, Query(ge=1, le=100_000)] = 200
) -> str:
    """The last ``tail`` lines of the Ray job's driver log (empty for a job that never reached Ray), read from the
    end of the file by Ray: the cost is the lines asked for, not the log's length."""
    job = owned(request, job_id, principal)
    if not job.reached_ray:
        return ""
    try:
        text = request.app.state.ray.logs(job.id, tail)
    except RayUnavailable as error:
        raise HTTPException(503, detail=f"cannot reach Ray for the logs: {error}") from None
    return "\n".join(text.splitlines()[-tail:]) + "\n" if text else ""


@router.get("/{job_id}/metrics", response_model=EpochMetrics)
def job_metrics(job_id: str, request: Request, principal: Principal) -> EpochMetrics:
    """Per-epoch history, read from the job's MLflow run."""
    job = owned(request, job_id, principal)
    found = run_id(request, job)
    if found is None:
        return EpochMetrics(job_id=job.id, mlflow_run_id=None, epochs=[])
    try:
        epochs = request.app.state.runs.history(job.spec["tracking"]["mlflow_uri"], found)
    except Exception as error:
        raise HTTPException(503, detail=f"cannot read the MLflow run {found}: {error}") from None
    return EpochMetrics(job_id=job.id, mlflow_run_id=found, epochs=epochs)
