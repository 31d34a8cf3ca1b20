"""``/v1/jobs``: submit, list, show, cancel, logs and per-epoch metrics. Another principal's job is a 404. The
work is `service.job_service.JobService`'s; these only translate HTTP."""

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from sse_starlette import EventSourceResponse

from service.auth import Principal
from service.deps import Events, Jobs
from service.events import Cursor
from service.schemas import EpochMetrics, JobList, JobView
from training.config import JobSpec
from training.states import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobView)
async def submit_job(
    spec: JobSpec,
    response: Response,
    principal: Principal,
    jobs: Jobs,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobView:
    """Queue a training job. With an ``Idempotency-Key`` header a retry returns the job the first call made
    (200 instead of 201); the same key with a different spec is a 409; a principal at its share of jobs not yet
    ended gets a 429 with ``Retry-After``."""
    job, created = await jobs.submit(principal, spec, idempotency_key)
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return jobs.summary(job)


@router.get("", response_model=JobList)
async def list_jobs(
    principal: Principal,
    jobs: Jobs,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> JobList:
    """This principal's jobs, newest first."""
    found, total = await jobs.page(principal, status, limit, offset)
    return JobList(items=[jobs.summary(job) for job in found], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobView)
async def show_job(job_id: str, principal: Principal, jobs: Jobs) -> JobView:
    """Status, progress (epoch k of N, ETA), latest metrics, the MLflow run and its link, timestamps, error."""
    return await jobs.view(job_id, principal)


@router.post("/{job_id}/cancel", response_model=JobView)
async def cancel_job(job_id: str, principal: Principal, jobs: Jobs) -> JobView:
    """A queued job is cancelled without reaching Ray; a submitted or running one is stopped on Ray."""
    return jobs.summary(await run_in_threadpool(jobs.cancel, job_id, principal))


@router.get("/{job_id}/logs", response_class=PlainTextResponse)
async def job_logs(
    job_id: str, principal: Principal, jobs: Jobs, tail: Annotated[int, Query(ge=1, le=100_000)] = 200
) -> str:
    """The last ``tail`` lines of the Ray job's driver log (empty for a job that never reached Ray), read from the
    end of the file by Ray: the cost is the lines asked for, not the log's length."""
    return await run_in_threadpool(jobs.logs, job_id, principal, tail)


@router.get("/{job_id}/metrics", response_model=EpochMetrics)
async def job_metrics(job_id: str, principal: Principal, jobs: Jobs) -> EpochMetrics:
    """Per-epoch history, read from the job's MLflow run."""
    return await run_in_threadpool(jobs.metrics, job_id, principal)


@router.get("/{job_id}/events", response_class=EventSourceResponse)
async def job_events(
    job_id: str,
    principal: Principal,
    jobs: Jobs,
    streams: Events,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> EventSourceResponse:
    """Server-sent events: ``state`` (each state change), ``epoch`` (each epoch's metrics), then ``end``. Each id
    is the stream's cursor: reconnect with ``Last-Event-ID`` to get what was missed, once (from any API process,
    after a restart too)."""
    job = await jobs.stored(jobs.owned, job_id, principal)
    cursor = Cursor.parse(last_event_id)
    streams.check()
    return EventSourceResponse(streams.job(job, cursor), ping=15)
