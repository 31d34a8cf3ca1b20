"""``/v1/studies``: one request for a whole table of the paper. Its children are ordinary jobs in the same durable
queue; the table is read from their MLflow runs. Another principal's study is a 404."""

import contextlib
import logging
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from mlflow.tracking import MlflowClient
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError

from service.admission import AdmissionUnavailable
from service.auth import Principal
from service.ray_jobs import RayUnavailable
from service.routes.jobs import reconciled, unavailable
from service.store import TERMINAL, IdempotencyConflict, Study, same_spec
from service.studies import admit_study, check_study_size, progress, summary_of, table_of, with_tracking_uri
from training.report import FORMATS
from training.study import StudyError, StudySpec, child_spec
from training.tracking import create_study_run

log = logging.getLogger("san.service")
router = APIRouter(prefix="/v1/studies", tags=["studies"])


class CellProgress(BaseModel):
    done: int
    running: int
    queued: int
    failed: int
    cancelled: int


class StudyView(BaseModel):
    id: str
    name: str
    status: str
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    cancel_requested: bool
    error: str | None
    mlflow_run_id: str | None
    cells: CellProgress  # the cells that run (merged and refused cells are counted apart)
    jobs: dict[str, int]  # children by state
    job_ids: list[str]
    refused_cells: int
    merged_cells: int
    table: dict[str, Any] | None = None


class StudyList(BaseModel):
    items: list[StudyView]
    total: int
    limit: int
    offset: int


def views(request: Request, studies: list[Study]) -> list[StudyView]:
    """The studies' progress from their stored summaries and their children's states, read in one query for
    them all: a page of studies costs two queries, whatever they hold."""
    children = request.app.state.studies.child_states([study.id for study in studies])
    out = []
    for study in studies:
        mine = children[study.id]
        found = progress(study.summary or {}, [(cell, status) for cell, _, status in mine])  # none yet: see summarise
        out.append(
            StudyView(
                id=study.id,
                name=study.spec["name"],
                status=study.status,
                spec=study.spec,
                created_at=study.created_at,
                updated_at=study.updated_at,
                cancel_requested=study.cancel_requested,
                error=study.error,
                mlflow_run_id=study.mlflow_run_id,
                cells=CellProgress(**found.cells),
                jobs=found.jobs,
                job_ids=[job_id for _, job_id, _ in mine],
                refused_cells=found.refused,
                merged_cells=found.merged,
            )
        )
    return out


def view(request: Request, study: Study, with_table: bool = False) -> StudyView:
    out = views(request, [study])[0]
    if with_table:
        state = request.app.state
        try:
            out.table = table_of(study, state.studies, state.settings, state.expansions)
        except Exception as error:  # MLflow down: the view goes without its table
            log.warning("table of %s: %s", study.id, error)
    return out


def owned(request: Request, study_id: str, principal: str) -> Study:
    study = request.app.state.studies.get(study_id, principal)
    if study is None:
        raise HTTPException(404, detail=f"no study {study_id!r}")
    return study


def _admit_and_store(
    request: Request,
    response: Response,
    principal: str,
    study: StudySpec,
    spec: dict[str, Any],
    idempotency_key: str | None,
) -> Study | StudyView:
    """Every cell checked in the admission worker, the parent run created, the study and its children stored."""
    state = request.app.state
    try:
        expansion = state.checks.run(admit_study, study, state.settings, state.cluster.value)
    except StudyError as error:
        raise HTTPException(422, detail=error.detail()) from None
    except AdmissionUnavailable as error:
        raise unavailable(f"checking the study: {error}") from None
    admitted = expansion.study
    study_id = f"study-{uuid.uuid4().hex[:16]}"
    uri = admitted.base.tracking.mlflow_uri
    try:
        parent = create_study_run(uri, admitted.experiment, state.settings.storage_root, study_id, admitted.name,
                                  admitted.model_dump_json(indent=2))  # fmt: skip
    except Exception as error:
        raise HTTPException(503, detail=f"cannot reach MLflow to record the study: {error}") from None
    children = [(child.cell, child.seed,
                 child_spec(admitted, expansion.cell(child.cell), child.seed, study_id, parent).model_dump(mode="json"))
                for child in expansion.children]  # fmt: skip
    try:
        return state.studies.create(principal, study_id, spec, idempotency_key, parent, children, summary_of(expansion))
    except Exception as error:
        with contextlib.suppress(Exception):  # no study holds it: don't leave it RUNNING (best effort)
            MlflowClient(uri).set_terminated(parent, "FAILED")
        existing = state.studies.by_key(principal, idempotency_key) if idempotency_key else None
        if not isinstance(error, IntegrityError) or existing is None:
            raise
        return _same(request, existing, spec, response)


@router.post("", status_code=201, response_model=StudyView)
def submit_study(
    study: StudySpec,
    request: Request,
    response: Response,
    principal: Principal,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> StudyView:
    """Queue every child of a study (cells × seeds, equal networks run once). Every cell is checked first —
    unknown axes, empty axes, too many cells or jobs, a cell the job rules refuse → 422 naming the axis, nothing
    queued; a principal at its share of running studies or of jobs not yet ended → 429 with ``Retry-After``.
    An ``Idempotency-Key`` retry returns the study the first call made (200); the same key with another spec is
    a 409."""
    state = request.app.state
    try:
        check_study_size(study, state.settings)  # from the spec alone, before the worker builds any model
        spec = with_tracking_uri(study, state.settings).model_dump(mode="json")  # as it will be stored
    except StudyError as error:
        raise HTTPException(422, detail=error.detail()) from None
    if idempotency_key:
        existing = state.studies.by_key(principal, idempotency_key)
        if existing is not None:
            return _same(request, existing, spec, response)
    # One admission at a time per principal, its jobs (at most cells × seeds: merging makes fewer) held against its
    # share until they are stored: a principal past either gets a 429 before the worker builds anything.
    with state.shares.admitting_study(principal, state.studies), state.shares.reserve(principal, study.size):
        stored = _admit_and_store(request, response, principal, study, spec, idempotency_key)
    if isinstance(stored, StudyView):
        return stored  # a concurrent request with the same Idempotency-Key made it
    state.dispatcher.kick()
    response.headers["Location"] = f"/v1/studies/{stored.id}"
    return view(request, stored)


def _same(request: Request, existing: Study, spec: dict[str, Any], response: Response) -> StudyView:
    try:
        same_spec("study", existing, spec)
    except IdempotencyConflict as error:
        raise HTTPException(409, detail=str(error)) from None
    response.status_code = 200
    response.headers["Location"] = f"/v1/studies/{existing.id}"
    return view(request, existing)


@router.get("", response_model=StudyList)
def list_studies(
    request: Request,
    principal: Principal,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> StudyList:
    """This principal's studies, newest first, with their progress (no tables: see each study)."""
    studies, total = request.app.state.studies.page(principal, limit, offset)
    return StudyList(items=views(request, studies), total=total, limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyView)
def show_study(study_id: str, request: Request, principal: Principal, table: bool = True) -> StudyView:
    """Progress (cells done/running/queued/failed, children by state) and the table so far (``table=false``: the
    progress alone, without reading MLflow — for polling)."""
    return view(request, owned(request, study_id, principal), with_table=table)


@router.get("/{study_id}/table")
def study_table(
    study_id: str, request: Request, principal: Principal, format: Literal["json", "md", "csv"] = "json"
) -> Any:
    """The table so far: JSON, Markdown in the paper's layout, or CSV."""
    study = owned(request, study_id, principal)
    try:
        state = request.app.state
        table = table_of(study, state.studies, state.settings, state.expansions)
    except Exception as error:
        raise HTTPException(503, detail=f"cannot read the study's runs from MLflow: {error}") from None
    if format == "json":
        return table
    media = "text/markdown" if format == "md" else "text/csv"
    return PlainTextResponse(FORMATS[format](table), media_type=f"{media}; charset=utf-8")


@router.post("/{study_id}/cancel", response_model=StudyView)
async def cancel_study(study_id: str, request: Request, principal: Principal) -> StudyView:
    """Cancel every child that has not ended (queued ones never reach Ray); the study ends ``cancelled`` once
    they all have."""
    study = owned(request, study_id, principal)
    if study.status != "running":
        raise HTTPException(409, detail=f"study {study_id} already ended: {study.status}")
    state = request.app.state

    def cancel_children() -> None:
        state.studies.request_cancel(study.id)
        for child in state.studies.children(study.id):
            job = reconciled(request, child.job)
            if job.status not in TERMINAL:
                state.dispatcher.cancel(job)
                state.shares.release(principal, 1)

    try:
        await run_in_threadpool(cancel_children)
    except RayUnavailable as error:
        raise HTTPException(503, detail=f"cannot reach Ray to stop the children: {error}") from None
    return await run_in_threadpool(view, request, state.studies.get(study.id) or study)
