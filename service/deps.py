"""The service's parts, made once by `create_app`'s lifespan and handed to routes as typed dependencies (the
FastAPI full-stack template's ``deps.py``): a route names what it needs — ``jobs: Jobs`` — and never reaches into
``app.state``. Async on purpose: a plain ``def`` dependency hops to the threadpool on every request."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.admission import ModelChecks
from service.comparison import CompareService
from service.events import EventStreams
from service.job_service import JobService
from service.progress import RunReader
from service.ray_jobs import RayJobs
from service.settings import ServiceSettings
from service.store import JobStore, WebhookStore
from service.study_service import StudyService


@dataclass(frozen=True)
class Parts:
    settings: ServiceSettings
    principals: dict[str, str]  # token hash → principal
    store: JobStore
    ray: RayJobs
    runs: RunReader
    checks: ModelChecks
    jobs: JobService
    studies: StudyService
    comparisons: CompareService
    events: EventStreams
    webhooks: WebhookStore


async def parts(request: Request) -> Parts:
    return request.app.state.parts


async def job_service(request: Request) -> JobService:
    return request.app.state.parts.jobs


async def study_service(request: Request) -> StudyService:
    return request.app.state.parts.studies


async def compare_service(request: Request) -> CompareService:
    return request.app.state.parts.comparisons


async def event_streams(request: Request) -> EventStreams:
    return request.app.state.parts.events


async def settings(request: Request) -> ServiceSettings:
    return request.app.state.parts.settings


Service = Annotated[Parts, Depends(parts)]
Jobs = Annotated[JobService, Depends(job_service)]
Studies = Annotated[StudyService, Depends(study_service)]
Compare = Annotated[CompareService, Depends(compare_service)]
Events = Annotated[EventStreams, Depends(event_streams)]
Settings = Annotated[ServiceSettings, Depends(settings)]
