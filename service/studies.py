"""The service's side of studies: admitting one (every child through the job admission rules, before anything is
queued), its progress from its children's job states, and the finisher that — once every child has ended —
writes the table and figures, logs them on the parent run and ends the study."""

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

from service.settings import ServiceSettings
from service.store import TERMINAL, Study, StudyChild, StudyStore
from service.validation import ClusterSize, Rejected, admit
from training.study import Expansion, StudyError, StudySpec, axis_of, expand
from training.study_results import table, write_results
from training.tracking import finish_study_run

log = logging.getLogger("san.service")


def admit_study(study: StudySpec, settings: ServiceSettings, cluster: ClusterSize) -> Expansion:
    """The expansion of ``study`` with the MLflow URI its runs will log to, once every cell passed `expand` and
    every child the job admission rules; `StudyError` naming the axis (or the base field) otherwise."""
    try:
        uri = settings.configured_mlflow_uri(study.base.tracking.mlflow_uri)
    except ValueError as error:
        raise StudyError(("base", "tracking", "mlflow_uri"), f"tracking.mlflow_uri: {error}") from None
    tracking = study.base.tracking.model_copy(update={"mlflow_uri": uri})
    study = study.model_copy(update={"base": study.base.model_copy(update={"tracking": tracking})})
    expansion = expand(study, settings.max_study_cells)
    for child in expansion.children:
        try:
            admit(child.spec, settings, cluster)
        except Rejected as error:
            raise StudyError(axis_of(study, error.loc), error.message) from None
    return expansion


def expansion_of(study: Study) -> Expansion:
    """The stored study's cells (the same as at submission: expansion is deterministic). Cached: expanding builds
    every cell's model on the meta device, and a study's spec never changes."""
    return _expansion(study.id, json.dumps(study.spec, sort_keys=True), study.mlflow_run_id)


@functools.lru_cache(maxsize=256)
def _expansion(study_id: str, spec: str, parent_run_id: str | None) -> Expansion:
    return expand(StudySpec.model_validate_json(spec), max_cells=10**9, study_id=study_id,
                  parent_run_id=parent_run_id)  # fmt: skip


JOB_TO_OBSERVED = {"queued": "queued", "submitted": "queued", "running": "running", "interrupted": "queued",
                   "succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}  # fmt: skip


def child_states(children: list[StudyChild]) -> dict[tuple[str, int], str]:
    return {(child.cell, child.seed): JOB_TO_OBSERVED[child.job.status] for child in children}


@dataclass(frozen=True)
class Progress:
    cells: dict[str, int]  # cells that run, by state: done, running, queued, failed, cancelled
    jobs: dict[str, int]  # children by job state
    refused: int  # cells the library refuses ("-")
    merged: int  # cells served by another cell's runs


def progress(expansion: Expansion, children: list[StudyChild]) -> Progress:
    """A running cell is done when all its seeds succeeded, failed when one failed, cancelled when one was
    cancelled, running while one is on the cluster, else queued."""
    by_cell: dict[str, list[str]] = {}
    for child in children:
        by_cell.setdefault(child.cell, []).append(child.job.status)
    cells = {"done": 0, "running": 0, "queued": 0, "failed": 0, "cancelled": 0}
    for states in by_cell.values():
        if all(state == "succeeded" for state in states):
            cells["done"] += 1
        elif "failed" in states:
            cells["failed"] += 1
        elif "cancelled" in states:
            cells["cancelled"] += 1
        elif any(state in ("submitted", "running") for state in states):
            cells["running"] += 1
        else:
            cells["queued"] += 1
    jobs: dict[str, int] = {}
    for child in children:
        jobs[child.job.status] = jobs.get(child.job.status, 0) + 1
    refused = sum(1 for cell in expansion.cells if cell.refused)
    merged = sum(1 for cell in expansion.cells if cell.runs_as and not cell.runs)
    return Progress(cells, jobs, refused, merged)


def outcome(children: list[StudyChild]) -> str | None:
    """The study's final state once every child has ended, else None."""
    states = [child.job.status for child in children]
    if any(state not in TERMINAL for state in states):
        return None
    if "failed" in states:
        return "failed"
    if "cancelled" in states:
        return "cancelled"
    return "succeeded"


MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}


class StudyFinisher:
    """Ends studies whose children have all ended: results written under the studies directory and logged on the
    parent run, which ends FINISHED, FAILED or KILLED; then the study's state. A failure (MLflow down) is retried
    at the next pass; state lives in the store, so a restarted service finishes what the last one could not."""

    MAX_ATTEMPTS = 5  # then the study ends failed, with the error, instead of being retried every pass

    def __init__(self, studies: StudyStore, settings: ServiceSettings) -> None:
        self.studies, self.settings = studies, settings
        self.attempts: dict[str, int] = {}

    def tick(self) -> None:
        for study in self.studies.in_state("running"):
            try:
                self.finish(study)
            except Exception as error:  # the next pass tries again, a few times
                self.attempts[study.id] = attempts = self.attempts.get(study.id, 0) + 1
                log.warning("study %s: could not finish (attempt %d): %s", study.id, attempts, error)
                if attempts >= self.MAX_ATTEMPTS:
                    self.studies.finish(study.id, "failed", error=f"writing the results failed: {error}")

    def finish(self, study: Study) -> bool:
        children = self.studies.children(study.id)
        final = outcome(children)
        if final is None:
            return False
        uri = self.settings.configured_mlflow_uri(study.spec["base"]["tracking"]["mlflow_uri"])  # never another
        results = self.settings.studies_dir() / study.id
        write_results(expansion_of(study), uri, study.mlflow_run_id, results, child_states(children))
        finish_study_run(uri, study.mlflow_run_id, results, MLFLOW_STATUS[final])
        self.attempts.pop(study.id, None)
        return self.studies.finish(study.id, final)

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.to_thread(self.tick)
            await asyncio.sleep(interval_s)


def table_of(study: Study, studies: StudyStore, settings: ServiceSettings) -> dict[str, Any]:
    """The table so far, read from MLflow (only ever a URI this service configured); once the study has ended, the
    table its finisher wrote."""
    written = settings.studies_dir() / study.id / "table.json"
    if study.status != "running" and written.is_file():
        return json.loads(written.read_text())
    children = studies.children(study.id)
    uri = settings.configured_mlflow_uri(study.spec["base"]["tracking"]["mlflow_uri"])
    return table(expansion_of(study), uri, study.mlflow_run_id, child_states(children))
