"""The FastAPI application: ``create_app(settings)`` wires the store, the Ray Jobs client (and, in local mode,
a Ray head this process owns), the queue's dispatcher and the MLflow reader, then mounts the routers."""

import asyncio
import contextlib
import gc
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from san import __version__
from service.admission import ModelChecks, ModelSizes
from service.auth import principals_by_hash
from service.comparison import CompareService
from service.deps import Parts
from service.errors import ServiceError, answer
from service.events import EventStreams
from service.job_service import JobService
from service.local_ray import LocalRayHead
from service.progress import RunReader
from service.queue import Dispatcher
from service.ray_jobs import RayJobs, auth_token
from service.routes import catalog, compare, health, jobs, studies, webhooks
from service.settings import ServiceSettings
from service.store import GroupCommit, JobStore, StudyStore, WebhookStore
from service.studies import Expansions, StudyFinisher
from service.study_service import StudyService
from service.validation import ClusterSize, JobShares
from service.webhooks import Deliverer
from training.config import MODELS_BUILT_ELSEWHERE
from training.driver_log import log_path
from training.paths import DATA_ROOT_ENV, STORAGE_ROOT_ENV

log = logging.getLogger("san.service")
CLUSTER_REFRESH_S = 10.0  # how often the cluster's size (for the workers check) is asked of Ray


class BodySizeLimit:
    """413 for request bodies above ``limit`` bytes, by header or as they stream in (pure ASGI, no buffering), with a
    JSON body naming the limit — FastAPI's own ``max_body_size`` answers with plain text "Content Too Large"."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self.too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        try:
            return await self.app(scope, counted, send)
        except BodyTooLarge:
            return await self.too_large(scope, receive, send)

    async def too_large(self, scope, receive, send):
        response = JSONResponse({"detail": f"request body larger than {self.limit} bytes"}, status_code=413)
        await response(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class ModelsBuiltElsewhere:
    """Every request's validation leaves building models to the admission worker (`MODELS_BUILT_ELSEWHERE`): the
    routes ask it (`ModelSizes`, `ModelChecks`), so no request builds a model in this process."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        token = MODELS_BUILT_ELSEWHERE.set(True)
        try:
            return await self.app(scope, receive, send)
        finally:
            MODELS_BUILT_ELSEWHERE.reset(token)


ECHOED_CHARS = 200  # of a string input, in a 422's body


def json_safe(value: Any) -> Any:
    """``value`` as JSON can always write it: NaN and ±inf as their names, long strings and huge integers cut, an
    exception as its message, anything else JSON lacks as its ``str``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 256 else f"<{value.bit_length()}-bit integer>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value if len(value) <= ECHOED_CHARS else f"{value[:ECHOED_CHARS]}… ({len(value)} characters)"
    if isinstance(value, dict):
        return {str(json_safe(key)): json_safe(inner) for key, inner in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(inner) for inner in value]
    return str(value)


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 with pydantic's errors, each made JSON-safe: its own handler echoes the input as it was
    parsed, and a NaN or an infinity there (Python's JSON parser reads them) made the 422 itself a 500."""
    return JSONResponse({"detail": json_safe(list(error.errors()))}, status_code=422)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    principals = principals_by_hash(settings.tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        head = None
        address = settings.ray_address
        token = auth_token(settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None)
        if address == "local":  # token auth on even with no token configured: the head then makes one
            head = LocalRayHead(
                settings.local_ray_port, settings.local_ray_dashboard_port, settings.local_ray_cpus, token=token
            )
            await asyncio.to_thread(head.start)
            address, token = head.address, head.token
            log.info("started a local Ray head (pid %s) at %s", head.process.pid, address)
        env = {DATA_ROOT_ENV: str(settings.data_root), STORAGE_ROOT_ENV: str(settings.storage_root),
               # Ray Jobs' stop_job sends SIGTERM, then SIGKILL after this wait (3 s by default): long enough for the
               # driver to have the workers checkpoint at a step boundary and end the MLflow run KILLED.
               "RAY_JOB_STOP_WAIT_TIME_S": f"{settings.job_stop_wait_s:g}"}  # fmt: skip
        ray = RayJobs(address, token, settings.python, env)
        store = JobStore(settings.database)
        dispatcher = Dispatcher(store, ray, settings.jobs_dir(), settings.max_submitted, settings.max_interruptions)
        runs = RunReader(settings.mlflow_uris.values())  # never a URI a request named
        cluster, shares, studies = ClusterSize(ray), JobShares(store, settings), StudyStore(store)
        checks = ModelChecks(settings.admission_timeout_s)
        await asyncio.to_thread(checks.start)  # the worker warms up while the service starts answering
        expansions = Expansions(checks)
        # the waits for the admission worker: their own threads, so a flood of checks never holds the default
        # executor's, which the queue's ticks, the finisher and every store call on PostgreSQL use
        admission_threads = ThreadPoolExecutor(4, thread_name_prefix="san-admission")
        jobs = JobService(
            settings,
            store,
            GroupCommit(store),
            dispatcher,
            ray,
            runs,
            shares,
            cluster,
            ModelSizes(checks),
            admission_threads,
        )
        study_service = StudyService(settings, studies, dispatcher, shares, cluster, checks, expansions)
        comparisons = CompareService(store, studies, expansions, runs)

        def job_log(job_id: str) -> Path:  # a job's log (training.driver_log), beside its spec
            return log_path(dispatcher.spec_path(job_id))

        events = EventStreams(store, studies, runs, job_log, max(settings.poll_interval_s, 0.5))
        hooks = WebhookStore(store)
        app.state.parts = Parts(
            settings, principals, store, ray, runs, checks, jobs, study_service, comparisons, events, hooks
        )
        finisher = StudyFinisher(studies, settings, expansions)
        tasks = [
            asyncio.create_task(dispatcher.run(settings.poll_interval_s)),  # its first tick reconciles
            asyncio.create_task(cluster.run(CLUSTER_REFRESH_S)),
            asyncio.create_task(finisher.run(settings.poll_interval_s)),
            asyncio.create_task(
                Deliverer(hooks, settings.webhook_allowed_hosts).run(min(settings.poll_interval_s, 1.0))
            ),
        ]
        # MLflow and SQLAlchemy leave ~200,000 objects behind (with torch, before it left this process: ~380,000); a
        # full collection over them takes ~200 ms, during which every request in flight waits. Frozen, never again.
        gc.freeze()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            store.close()
            ray.close()
            await asyncio.to_thread(checks.close)
            admission_threads.shutdown(wait=False, cancel_futures=True)
            if head is not None:
                await asyncio.to_thread(head.stop)

    app = FastAPI(title="SAN training service", version=__version__, lifespan=lifespan,
                  description="Submit and follow Scale-Space Attention Network training jobs on Ray.")  # fmt: skip
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(ModelsBuiltElsewhere)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(ServiceError, answer)
    for router in (jobs.router, studies.router, compare.router, webhooks.router, catalog.router, health.router):
        app.include_router(router)
    return app
