"""``/v1/studies``: one request for a whole table of the paper. Its children are ordinary jobs in the same durable
queue; the table is read from their MLflow runs. Another principal's study is a 404. The work is
`service.study_service.StudyService`'s; these only translate HTTP."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from sse_starlette import EventSourceResponse

from service.auth import Principal
from service.deps import Events, Studies
from service.events import Cursor
from service.schemas import MoreSeeds, StudyList, StudyPlan, StudyView
from training.report import FORMATS
from training.study import StudySpec

router = APIRouter(prefix="/v1/studies", tags=["studies"])


@router.post("", status_code=201, response_model=StudyView)
async def submit_study(
    study: StudySpec,
    response: Response,
    principal: Principal,
    studies: Studies,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> StudyView:
    """Queue every child of a study (cells × seeds, equal networks run once). Every cell is checked first —
    unknown axes, empty axes, too many cells or jobs, a cell the job rules refuse → 422 naming the axis, nothing
    queued; a principal at its share of running studies or of jobs not yet ended → 429 with ``Retry-After``.
    An ``Idempotency-Key`` retry returns the study the first call made (200); the same key with another spec is
    a 409."""
    view, created = await run_in_threadpool(studies.submit, principal, study, idempotency_key)
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/studies/{view.id}"
    return view


@router.post("/plan", response_model=StudyPlan)
async def plan_study(study: StudySpec, principal: Principal, studies: Studies) -> StudyPlan:
    """A dry run: the cells (merged and refused ones with their reasons), the jobs, and what they would cost — CPU-
    or GPU-hours and the time on the service's slots, from earlier runs of the same network, dataset and worker
    count — checked as a submission is (422 naming the axis), with nothing queued or recorded."""
    return await run_in_threadpool(studies.plan, study)


@router.get("", response_model=StudyList)
async def list_studies(
    principal: Principal,
    studies: Studies,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> StudyList:
    """This principal's studies, newest first, with their progress (no tables: see each study)."""
    views, total = await run_in_threadpool(studies.page, principal, limit, offset)
    return StudyList(items=views, total=total, limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyView)
async def show_study(study_id: str, principal: Principal, studies: Studies, table: bool = True) -> StudyView:
    """Progress (cells done/running/queued/failed, children by state) and the table so far (``table=false``: the
    progress alone, without reading MLflow — for polling)."""
    return await run_in_threadpool(studies.view, study_id, principal, table)


@router.get("/{study_id}/table")
async def study_table(
    study_id: str, principal: Principal, studies: Studies, format: Literal["json", "md", "csv"] = "json"
) -> Any:
    """The table so far: JSON, Markdown in the paper's layout, or CSV."""
    table = await run_in_threadpool(studies.table, study_id, principal)
    if format == "json":
        return table
    media = "text/markdown" if format == "md" else "text/csv"
    return PlainTextResponse(FORMATS[format](table), media_type=f"{media}; charset=utf-8")


@router.post("/{study_id}/cancel", response_model=StudyView)
async def cancel_study(study_id: str, principal: Principal, studies: Studies) -> StudyView:
    """Cancel every child that has not ended (queued ones never reach Ray); the study ends ``cancelled`` once
    they all have."""
    return await run_in_threadpool(studies.cancel, study_id, principal)


@router.post("/{study_id}/retry", response_model=StudyView)
async def retry_study(study_id: str, principal: Principal, studies: Studies) -> StudyView:
    """Run each failed or cancelled cell again (new jobs, the same specs) into the same study, which runs again;
    its table reads the newest run of each cell and seed. Nothing failed or cancelled: 409."""
    return await run_in_threadpool(studies.retry, study_id, principal)


@router.post("/{study_id}/seeds", response_model=StudyView)
async def add_seeds(study_id: str, more: MoreSeeds, principal: Principal, studies: Studies) -> StudyView:
    """Run every cell on more seeds (seeds it has already: 422): the study runs again, and its table grows."""
    return await run_in_threadpool(studies.add_seeds, study_id, principal, more.seeds)


@router.get("/{study_id}/events", response_class=EventSourceResponse)
async def study_events(
    study_id: str,
    principal: Principal,
    studies: Studies,
    streams: Events,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> EventSourceResponse:
    """Server-sent events: ``state`` for each change of a child's state (with its cell and seed), then ``end`` when
    the study ended; resumable with ``Last-Event-ID`` as a job's are."""
    await run_in_threadpool(studies.owned, study_id, principal)
    cursor = Cursor.parse(last_event_id)
    streams.check()
    return EventSourceResponse(streams.study(study_id, cursor), ping=15)
