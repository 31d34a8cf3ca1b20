"""The service's side of studies: admitting one (every child through the job admission rules, before anything is
queued), its progress from its children's job states, and the finisher that — once every child has ended —
writes the table and figures, logs them on the parent run and ends the study."""

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.admission import ModelChecks
from service.schemas import CellProgress
from service.settings import ServiceSettings
from service.store import Study, StudyChild, StudyStore
from service.validation import Rejected, admit, reject_reserved_tags
from training.mlflow_runs import finish_study_run
from training.states import ACTIVE, WAITING, JobStatus, StudyStatus
from training.study import STORED, Expansion, StudyError, StudySpec, axis_of, check_cells, expand
from training.study_results import table, write_results

log = logging.getLogger("san.service")


def check_study_size(study: StudySpec, settings: ServiceSettings) -> None:
    """What can be told from the spec alone, before anything is built: the base's tags, and the grid's size
    (cells, and cells × seeds) against this service's limits; `StudyError` naming the field."""
    try:
        reject_reserved_tags(study.base.tracking.tags)
    except Rejected as error:
        raise StudyError(("base", *error.loc), error.message) from None
    check_cells(study, settings.max_study_cells)
    if study.size > settings.max_study_jobs:
        raise StudyError(
            ("seeds",),
            f"{study.cell_count} cells × {len(study.seeds)} seeds = {study.size} jobs is "
            f"more than this service's limit of {settings.max_study_jobs} jobs a study",
        )


def with_tracking_uri(study: StudySpec, settings: ServiceSettings) -> StudySpec:
    """``study`` with the MLflow URI its runs will log to: the service's, or one its operator allowed."""
    try:
        uri = settings.configured_mlflow_uri(study.base.tracking.mlflow_uri)
    except ValueError as error:
        raise StudyError(("base", "tracking", "mlflow_uri"), f"tracking.mlflow_uri: {error}") from None
    tracking = study.base.tracking.model_copy(update={"mlflow_uri": uri})
    return study.model_copy(update={"base": study.base.model_copy(update={"tracking": tracking})})


def admit_study(study: StudySpec, settings: ServiceSettings, size: dict[str, float] | None) -> Expansion:
    """The expansion of ``study`` with the MLflow URI its runs will log to, once every cell passed `expand` and
    every child the job admission rules; `StudyError` naming the axis (or the base field) otherwise. Builds every
    cell's model: the service runs it in its admission worker (`ModelChecks`)."""
    check_study_size(study, settings)
    study = with_tracking_uri(study, settings)
    expansion = expand(study, settings.max_study_cells)
    for child in expansion.children:
        try:
            admit(child.spec, settings, size, own_tags=True)
        except Rejected as error:
            raise StudyError(axis_of(study, error.loc), error.message) from None
    return expansion


def expand_stored(spec: str, study_id: str, parent_run_id: str | None) -> Expansion:
    """A stored study's expansion (run in the admission worker): the same as at submission, expansion being
    deterministic."""
    return expand(
        StudySpec.model_validate_json(spec, context={STORED: True}),
        max_cells=10**9,
        study_id=study_id,
        parent_run_id=parent_run_id,
    )


def summary_of(expansion: Expansion) -> dict[str, int]:
    """What a study's reads show of its expansion, stored with it at creation."""
    return {
        "cells": len(expansion.cells),
        "refused": sum(1 for cell in expansion.cells if cell.refused),
        "merged": sum(1 for cell in expansion.cells if cell.runs_as and not cell.runs),
    }


class Expansions:
    """Stored studies' expansions, made in the admission worker and kept for the most recently used studies (a
    study's spec changes only when seeds are added, which `forget`s it): for the tables and figures, which need
    every cell."""

    def __init__(self, checks: ModelChecks, keep: int = 64) -> None:
        self.checks, self.keep = checks, keep
        self._kept: OrderedDict[str, Expansion] = OrderedDict()
        self._lock = threading.Lock()

    def forget(self, study_id: str) -> None:
        """A study whose spec grew (more seeds): its expansion is made again on next use."""
        with self._lock:
            self._kept.pop(study_id, None)

    def of(self, study: Study) -> Expansion:
        with self._lock:
            if study.id in self._kept:
                self._kept.move_to_end(study.id)
                return self._kept[study.id]
        found = self.checks.run(expand_stored, json.dumps(study.spec, sort_keys=True), study.id, study.mlflow_run_id)
        with self._lock:
            self._kept[study.id] = found
            while len(self._kept) > self.keep:
                self._kept.popitem(last=False)
        return found


def observed(status: JobStatus) -> str:
    """A child's state as a study's table shows it: waiting (in the queue or back in it) is queued."""
    waiting = status in WAITING or status == JobStatus.SUBMITTED
    return JobStatus.QUEUED if waiting else status


def child_states(children: list[StudyChild]) -> dict[tuple[str, int], str]:
    return {(child.cell, child.seed): observed(child.job.status) for child in children}


@dataclass(frozen=True)
class Progress:
    cells: dict[str, int]  # cells that run, by state: done, running, queued, failed, cancelled
    jobs: dict[str, int]  # children by job state
    refused: int  # cells the library refuses ("-")
    merged: int  # cells served by another cell's runs


def progress(summary: dict[str, int], children: list[tuple[str, str]]) -> Progress:
    """From the stored summary and the children as (cell, job state): a running cell is done when all its seeds
    succeeded, failed when one failed, cancelled when one was cancelled, running while one is on the cluster,
    else queued."""
    by_cell: dict[str, list[str]] = {}
    for cell, status in children:
        by_cell.setdefault(cell, []).append(status)
    cells = dict.fromkeys(CellProgress.model_fields, 0)  # done, and the states a cell shares with its jobs
    for states in by_cell.values():
        if all(state == JobStatus.SUCCEEDED for state in states):
            cells["done"] += 1
        elif JobStatus.FAILED in states:
            cells[JobStatus.FAILED] += 1
        elif JobStatus.CANCELLED in states:
            cells[JobStatus.CANCELLED] += 1
        elif any(state in ACTIVE for state in states):
            cells[JobStatus.RUNNING] += 1
        else:
            cells[JobStatus.QUEUED] += 1
    jobs: dict[str, int] = {}
    for _, status in children:
        jobs[status] = jobs.get(status, 0) + 1
    return Progress(cells, jobs, summary.get("refused", 0), summary.get("merged", 0))


def outcome(children: list[StudyChild]) -> StudyStatus | None:
    """The study's final state once every child has ended, else None."""
    states = [child.job.status for child in children]
    if not all(state.is_terminal() for state in states):
        return None
    if JobStatus.FAILED in states:
        return StudyStatus.FAILED
    if JobStatus.CANCELLED in states:
        return StudyStatus.CANCELLED
    return StudyStatus.SUCCEEDED


def write_and_log_results(
    expansion: Expansion, uri: str, run_id: str, results: Path, states: dict[tuple[str, int], str], status: str
) -> None:
    """The study's table and figures written under ``results`` and logged on its parent run, which ends with
    ``status``: drawn in the admission worker (`ModelChecks.run`), never in the API process."""
    write_results(expansion, uri, run_id, results, states)
    finish_study_run(uri, run_id, results, status)


class StudyFinisher:
    """Ends studies whose children have all ended: results written under the studies directory and logged on the
    parent run, which ends FINISHED, FAILED or KILLED; then the study's state. A failure (MLflow down) is retried
    at the next pass; state lives in the store, so a restarted service finishes what the last one could not."""

    MAX_ATTEMPTS = 5  # then the study ends failed, with the error, instead of being retried every pass

    def __init__(self, studies: StudyStore, settings: ServiceSettings, expansions: Expansions) -> None:
        self.studies, self.settings, self.expansions = studies, settings, expansions
        self.attempts: dict[str, int] = {}
        self.summarised = False  # no study without a summary is left

    def tick(self) -> None:
        self.summarise()
        for study in self.studies.in_state(StudyStatus.RUNNING):
            try:
                self.finish(study)
            except Exception as error:  # the next pass tries again, a few times
                self.attempts[study.id] = attempts = self.attempts.get(study.id, 0) + 1
                log.warning("study %s: could not finish (attempt %d): %s", study.id, attempts, error)
                if attempts >= self.MAX_ATTEMPTS:
                    error = f"writing the results failed: {error}"
                    self.studies.finish(study.id, StudyStatus.FAILED, error=error)

    def summarise(self, at_most: int = 10) -> None:
        """Studies stored before summaries were (a database an earlier version made): theirs, made in the admission
        worker a few at a time, so their reads never expand them. Every study stored since has one, so once none is
        left the passes stop asking."""
        if self.summarised:
            return
        missing = self.studies.unsummarised(at_most)
        self.summarised = not missing
        for study in missing:
            try:
                self.studies.set_summary(study.id, summary_of(self.expansions.of(study)))
            except Exception as error:  # the next pass tries again; reads show no refused or merged cells meanwhile
                log.warning("study %s: no summary yet: %s", study.id, error)

    def finish(self, study: Study) -> bool:
        children = self.studies.children(study.id)
        final = outcome(children)
        if final is None:
            return False
        uri = self.settings.configured_mlflow_uri(study.spec["base"]["tracking"]["mlflow_uri"])  # never another
        results = self.settings.studies_dir() / study.id
        self.expansions.checks.run(
            write_and_log_results,
            self.expansions.of(study),
            uri,
            study.mlflow_run_id,
            results,
            child_states(children),
            final.mlflow_status(),
        )
        self.attempts.pop(study.id, None)
        written = results / "table.json"
        table = json.loads(written.read_text()) if written.is_file() else None
        return self.studies.finish(study.id, final, table=table)

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.to_thread(self.tick)
            await asyncio.sleep(interval_s)


def table_of(study: Study, studies: StudyStore, settings: ServiceSettings, expansions: Expansions) -> dict[str, Any]:
    """The table so far, read from MLflow (only ever a URI this service configured); once the study has ended, the
    table its finisher wrote."""
    written = settings.studies_dir() / study.id / "table.json"
    if study.status.is_terminal() and written.is_file():
        return json.loads(written.read_text())
    children = studies.children(study.id)
    uri = settings.configured_mlflow_uri(study.spec["base"]["tracking"]["mlflow_uri"])
    return table(expansions.of(study), uri, study.mlflow_run_id, child_states(children))
