"""What the service does with studies — admit every cell, record the parent MLflow run, store the study and its
children in one transaction (rolling the run back when that fails), list, show with the table so far, cancel — for
the routes, which only translate HTTP."""

import contextlib
import json
import logging
import uuid
from typing import Any

from mlflow.tracking import MlflowClient
from sqlalchemy.exc import IntegrityError

from service.admission import AdmissionUnavailable, ModelChecks
from service.errors import Conflict, Invalid, NotFound, Unavailable, value_error
from service.estimates import schedule
from service.job_service import ADMISSION_RETRY_AFTER
from service.queue import Dispatcher
from service.ray_jobs import RayUnavailable
from service.schemas import CellProgress, PlannedCell, StudyPlan, StudyView
from service.settings import ServiceSettings
from service.standing import cpus_needed
from service.store import IdempotencyConflict, Study, StudyStore, same_spec
from service.studies import (
    Expansions,
    admit_study,
    check_study_size,
    expand_stored,
    progress,
    summary_of,
    table_of,
    with_tracking_uri,
)
from service.validation import ClusterSize, JobShares
from training.mlflow_runs import create_study_run
from training.states import JobStatus, StudyStatus
from training.study import STORED, Expansion, StudyError, StudySpec, child_spec

log = logging.getLogger("san.service")


class StudyService:
    def __init__(
        self,
        settings: ServiceSettings,
        studies: StudyStore,
        dispatcher: Dispatcher,
        shares: JobShares,
        cluster: ClusterSize,
        checks: ModelChecks,
        expansions: Expansions,
    ) -> None:
        self.settings, self.studies, self.dispatcher, self.shares = settings, studies, dispatcher, shares
        self.cluster, self.checks, self.expansions = cluster, checks, expansions

    def views(self, studies: list[Study]) -> list[StudyView]:
        """The studies' progress from their stored summaries and their children's states, read in one query for
        them all: a page of studies costs two queries, whatever they hold."""
        children = self.studies.child_states([study.id for study in studies])
        out = []
        for study in studies:
            mine = children[study.id]
            found = progress(study.summary or {}, [(cell, status) for cell, _, status in mine])
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

    def owned(self, study_id: str, principal: str) -> Study:
        study = self.studies.get(study_id, principal)
        if study is None:
            raise NotFound(f"no study {study_id!r}")
        return study

    def view(self, study_id: str, principal: str, with_table: bool = False) -> StudyView:
        study = self.owned(study_id, principal)
        out = self.views([study])[0]
        if with_table:
            try:
                out.table = table_of(study, self.studies, self.settings, self.expansions)
            except Exception as error:  # MLflow down: the view goes without its table
                log.warning("table of %s: %s", study.id, error)
        return out

    def page(self, principal: str, limit: int, offset: int) -> tuple[list[StudyView], int]:
        studies, total = self.studies.page(principal, limit, offset)
        return self.views(studies), total

    def table(self, study_id: str, principal: str) -> dict[str, Any]:
        study = self.owned(study_id, principal)
        try:
            return table_of(study, self.studies, self.settings, self.expansions)
        except Exception as error:
            raise Unavailable(f"cannot read the study's runs from MLflow: {error}") from None

    def submit(self, principal: str, study: StudySpec, idempotency_key: str | None) -> tuple[StudyView, bool]:
        """The study stored (created: True), or the one an Idempotency-Key made before with this spec."""
        try:
            check_study_size(study, self.settings)  # from the spec alone, before the worker builds any model
            spec = with_tracking_uri(study, self.settings).model_dump(mode="json")  # as it will be stored
        except StudyError as error:
            raise Invalid(error.detail()) from None
        if idempotency_key:
            existing = self.studies.by_key(principal, idempotency_key)
            if existing is not None:
                return self.same(existing, spec), False
        # One admission at a time per principal, its jobs (at most cells × seeds: merging makes fewer) held against
        # its share until they are stored: a principal past either gets a 429 before the worker builds anything.
        with self.shares.admitting_study(principal, self.studies), self.shares.reserve(principal, study.size):
            stored = self.admit_and_store(principal, study, spec, idempotency_key)
        if isinstance(stored, StudyView):
            return stored, False  # a concurrent request with the same Idempotency-Key made it
        self.dispatcher.kick()
        return self.views([stored])[0], True

    def admit_and_store(
        self, principal: str, study: StudySpec, spec: dict[str, Any], idempotency_key: str | None
    ) -> Study | StudyView:
        """Every cell checked in the admission worker, the parent run created, the study and its children stored."""
        expansion = self.admitted(study)
        admitted = expansion.study
        study_id = f"study-{uuid.uuid4().hex[:16]}"
        uri = admitted.base.tracking.mlflow_uri
        try:
            parent = create_study_run(
                uri,
                admitted.experiment,
                self.settings.storage_root,
                study_id,
                admitted.name,
                admitted.model_dump_json(indent=2),
            )
        except Exception as error:
            raise Unavailable(f"cannot reach MLflow to record the study: {error}") from None
        children = [
            (
                child.cell,
                child.seed,
                child_spec(admitted, expansion.cell(child.cell), child.seed, study_id, parent).model_dump(mode="json"),
            )
            for child in expansion.children
        ]
        try:
            return self.studies.create(
                principal, study_id, spec, idempotency_key, parent, children, summary_of(expansion)
            )
        except Exception as error:
            with contextlib.suppress(Exception):  # no study holds it: don't leave it RUNNING (best effort)
                MlflowClient(uri).set_terminated(parent, JobStatus.FAILED.mlflow_status())
            existing = self.studies.by_key(principal, idempotency_key) if idempotency_key else None
            if not isinstance(error, IntegrityError) or existing is None:
                raise
            return self.same(existing, spec)

    def admitted(self, study: StudySpec) -> Expansion:
        """``study`` expanded, each cell checked in the admission worker (after its size, from the spec alone):
        422 naming the axis, 503 while the worker is away."""
        try:
            check_study_size(study, self.settings)
            return self.checks.run(admit_study, study, self.settings, self.cluster.value)
        except StudyError as error:
            raise Invalid(error.detail()) from None
        except AdmissionUnavailable as error:
            raise Unavailable(f"checking the study: {error}", ADMISSION_RETRY_AFTER) from None

    def plan(self, study: StudySpec) -> StudyPlan:
        """The study checked as `submit` checks it — 422 naming the axis, 503 while the admission worker is away —
        and its cost from the history of earlier runs; nothing is stored, nothing reaches MLflow or Ray."""
        expansion = self.admitted(study)
        history = self.dispatcher.history
        specs = [child.spec.model_dump(mode="json") for child in expansion.children]
        # (seconds on a slot, CPUs, GPUs) of each child the history estimates
        known = [
            (seconds, *cpus_needed(spec["scaling"])[1:])
            for spec in specs
            if (seconds := history.duration(spec)) is not None
        ]
        cpu = sum(seconds * cpus for seconds, cpus, _ in known) / 3600
        gpu = sum(seconds * gpus for seconds, _, gpus in known) / 3600
        ends = schedule([(str(i), k[0]) for i, k in enumerate(known)], [], max(1, self.settings.max_submitted))
        bases, counts = sorted({history.basis(spec) for spec in specs}), summary_of(expansion)
        return StudyPlan(
            cells=[
                PlannedCell(key=c.key, labels=c.labels, runs_as=c.runs_as, refused=c.refused) for c in expansion.cells
            ],
            refused=counts["refused"],
            merged=counts["merged"],
            jobs=len(specs),
            estimated_jobs=len(known),
            cpu_hours=cpu if known else None,
            gpu_hours=gpu if any(gpus for _, _, gpus in known) else None,
            wall_s=max(end for _, end in ends.values()) if known else None,
            estimate="; ".join(bases),
        )

    def same(self, existing: Study, spec: dict[str, Any]) -> StudyView:
        try:
            same_spec("study", existing, spec)
        except IdempotencyConflict as error:
            raise Conflict(str(error)) from None
        return self.views([existing])[0]

    def retry(self, study_id: str, principal: str) -> StudyView:
        """Each cell whose newest job failed or was cancelled runs again (a new job, the same spec) into the same
        study, which runs again; its table then reads the newest run of each cell and seed."""
        study = self.reopenable(study_id, principal)
        again = [c for c in self.studies.children(study.id) if c.job.status in (JobStatus.FAILED, JobStatus.CANCELLED)]
        if not again:
            raise Conflict(f"study {study_id} has no failed or cancelled cell to run again")
        with self.shares.reserve(principal, len(again)):
            self.studies.add_children(study.id, principal, [(c.cell, c.seed, c.job.spec) for c in again])
        return self.reopened(study)

    def add_seeds(self, study_id: str, principal: str, seeds: list[int]) -> StudyView:
        """Every cell that runs, on each of ``seeds`` too (seeds the study has already: 422): the study runs again
        and its table grows by those seeds."""
        study = self.reopenable(study_id, principal)
        spec = StudySpec.model_validate(study.spec, context={STORED: True})
        if repeated := sorted(set(seeds) & set(spec.seeds)):
            raise value_error(f"the study has seeds {repeated} already", ("body", "seeds"))
        grown = spec.model_copy(update={"seeds": [*spec.seeds, *dict.fromkeys(seeds)]})
        try:
            check_study_size(grown, self.settings)
        except StudyError as error:
            raise Invalid(error.detail()) from None
        stored = grown.model_dump(mode="json")
        try:
            expansion = self.checks.run(
                expand_stored, json.dumps(stored, sort_keys=True), study.id, study.mlflow_run_id
            )
        except AdmissionUnavailable as error:
            raise Unavailable(f"expanding the study: {error}", ADMISSION_RETRY_AFTER) from None
        added = [
            (
                child.cell,
                child.seed,
                child_spec(
                    expansion.study, expansion.cell(child.cell), child.seed, study.id, study.mlflow_run_id
                ).model_dump(mode="json"),
            )
            for child in expansion.children
            if child.seed in seeds
        ]
        with self.shares.reserve(principal, len(added)):
            self.studies.add_children(study.id, principal, added, spec=stored)
        self.expansions.forget(study.id)
        return self.reopened(study)

    def reopenable(self, study_id: str, principal: str) -> Study:
        """The principal's study, unless its cancel is under way (409)."""
        study = self.owned(study_id, principal)
        if study.status == StudyStatus.RUNNING and study.cancel_requested:
            raise Conflict(f"study {study_id} is being cancelled")
        return study

    def reopened(self, study: Study) -> StudyView:
        """The study's parent run running again (its table and figures are made again when it ends)."""
        uri = self.settings.configured_mlflow_uri(study.spec["base"]["tracking"]["mlflow_uri"])
        try:
            MlflowClient(uri).update_run(study.mlflow_run_id, status="RUNNING")
        except Exception as error:  # the run's state only: the children are queued, the finisher ends it again
            log.warning("study %s: could not reopen its MLflow run: %s", study.id, error)
        self.dispatcher.kick()
        return self.views([self.studies.get(study.id) or study])[0]

    def cancel(self, study_id: str, principal: str) -> StudyView:
        """Cancel every child that has not ended (waiting ones never reach Ray); the study ends ``cancelled`` once
        they all have."""
        study = self.owned(study_id, principal)
        if study.status != StudyStatus.RUNNING:
            raise Conflict(f"study {study_id} already ended: {study.status}")
        self.studies.request_cancel(study.id)
        try:
            for child in self.studies.children(study.id):
                if not child.job.status.is_terminal() and self.dispatcher.cancel(child.job):
                    self.shares.release(principal, 1)
        except RayUnavailable as error:
            raise Unavailable(f"cannot reach Ray to stop the children: {error}") from None
        return self.views([self.studies.get(study.id) or study])[0]
