"""Whether the difference between two sets of runs is real (``GET /v1/compare``): on each side a job, a list of
jobs, or a study's cell (``STUDY_ID/CELL``), paired on the seeds both sides ran (`training.paired`). Only the
principal's own jobs and studies count; a side holds at most `MAX_JOBS` jobs, each read from MLflow once."""

import re

from service.admission import AdmissionUnavailable
from service.errors import NotFound, Unavailable, value_error
from service.job_service import ADMISSION_RETRY_AFTER
from service.progress import RunReader
from service.schemas import Comparison, Side
from service.store import Job, JobStore, StudyStore
from service.studies import Expansions
from training.metrics import METRICS
from training.paired import paired_difference
from training.states import JobStatus

MAX_JOBS = 64
CELL_REF = re.compile(r"(study-[0-9a-f]+)/(c\d+)")


class CompareService:
    def __init__(self, jobs: JobStore, studies: StudyStore, expansions: Expansions, runs: RunReader) -> None:
        self.jobs, self.studies, self.expansions, self.runs = jobs, studies, expansions, runs

    def compare(self, a: str, b: str, metric: str, principal: str) -> Comparison:
        first, second = self.side(a, "a", metric, principal), self.side(b, "b", metric, principal)
        difference = paired_difference(first.values, second.values, METRICS[metric].higher_is_better)
        return Comparison(metric=metric, a=first, b=second, difference=difference)

    def side(self, ref: str, name: str, metric: str, principal: str) -> Side:
        key = METRICS[metric].key
        values: dict[int, float] = {}
        chosen: dict[int, str] = {}
        skipped: dict[str, str] = {}
        for job in self.jobs_of(ref, name, principal):
            seed = int(job.spec["training"]["seed"])
            if job.status != JobStatus.SUCCEEDED or job.mlflow_run_id is None:
                skipped[job.id] = f"{job.status}" if job.status != JobStatus.SUCCEEDED else "no MLflow run"
                continue
            if seed in chosen:
                message = f"{chosen[seed]} and {job.id} both ran seed {seed}: one run per seed"
                raise value_error(message, ("query", name))
            try:
                value = self.runs.final(job.spec["tracking"]["mlflow_uri"], job.mlflow_run_id, key)
            except ValueError as error:  # a URI this service does not read
                skipped[job.id] = str(error)
                continue
            except Exception as error:
                raise Unavailable(f"cannot read the MLflow run {job.mlflow_run_id}: {error}") from None
            if value is None:
                skipped[job.id] = f"its run logged no {key}"
                continue
            values[seed], chosen[seed] = value, job.id
        return Side(ref=ref, jobs=chosen, values=values, skipped=skipped)

    def jobs_of(self, ref: str, name: str, principal: str) -> list[Job]:
        if match := CELL_REF.fullmatch(ref):
            return self.cell_jobs(match[1], match[2], name, principal)
        ids = list(dict.fromkeys(part.strip() for part in ref.split(",") if part.strip()))
        if not ids or len(ids) > MAX_JOBS:
            raise value_error(f"name 1 to {MAX_JOBS} job ids (comma-separated) or STUDY_ID/CELL", ("query", name))
        jobs = []
        for job_id in ids:
            job = self.jobs.get(job_id, principal)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            jobs.append(job)
        return jobs

    def cell_jobs(self, study_id: str, key: str, name: str, principal: str) -> list[Job]:
        study = self.studies.get(study_id, principal)
        if study is None:
            raise NotFound(f"no study {study_id!r}")
        try:
            expansion = self.expansions.of(study)
        except AdmissionUnavailable as error:
            raise Unavailable(f"expanding the study: {error}", ADMISSION_RETRY_AFTER) from None
        cell = next((cell for cell in expansion.cells if cell.key == key), None)
        if cell is None:
            raise NotFound(f"study {study_id} has no cell {key!r}")
        if cell.refused:
            raise value_error(f"cell {key} never ran: {cell.refused}", ("query", name))
        runs_as = cell.runs_as or cell.key
        return [child.job for child in self.studies.children(study.id) if child.cell == runs_as][:MAX_JOBS]
