"""What the API answers with: the views of jobs and studies (requests are `training.config.JobSpec` and
`training.study.StudySpec` themselves)."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from training.config import Seed
from training.states import JobStatus, StudyStatus


class Transition(BaseModel):
    status: JobStatus
    at: datetime


class Progress(BaseModel):
    epoch: int  # epochs finished
    epochs: int
    eta_s: float | None


class QueueStanding(BaseModel):
    """Why a job that is not running yet waits (`service.standing`)."""

    position: int | None  # 1: the next job the service submits; None once on Ray (or not ranked yet)
    ahead: int | None  # jobs the service submits before it
    reason: str
    fits: bool  # whether the cluster as it is could ever run it
    starts_at: datetime | None = None  # estimated from earlier runs (`service.estimates`), None without one
    ends_at: datetime | None = None
    estimate: str | None = None  # what the estimate rests on, or why there is none


class JobView(BaseModel):
    id: str
    status: JobStatus
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
    queue: QueueStanding | None = None  # while it waits: its place and why


class JobList(BaseModel):
    items: list[JobView]
    total: int
    limit: int
    offset: int


class EpochMetrics(BaseModel):
    job_id: str
    mlflow_run_id: str | None
    epochs: list[dict[str, Any]]


class CellProgress(BaseModel):
    done: int
    running: int
    queued: int
    failed: int
    cancelled: int


class StudyView(BaseModel):
    id: str
    name: str
    status: StudyStatus
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


class Side(BaseModel):
    ref: str  # as asked: job ids, or STUDY_ID/CELL
    jobs: dict[int, str]  # seed → the job whose run counts (succeeded, with a run)
    values: dict[int, float]  # seed → the metric at the run's last epoch
    skipped: dict[str, str] = {}  # job id → why it does not count (not succeeded, no run, no value)


class Comparison(BaseModel):
    metric: str
    a: Side
    b: Side
    # a − b on the seeds both have (`training.paired.paired_difference`): mean, std, n, values, seeds, positive,
    # better, ci95, resolved, seeds_to_resolve; None when they share no seed
    difference: dict[str, Any] | None


class PlannedCell(BaseModel):
    key: str
    labels: dict[str, str]
    runs_as: str | None  # the cell whose runs serve this one (itself when it runs)
    refused: str | None  # why the library cannot build it


class StudyPlan(BaseModel):
    """What a study would queue, checked as a submission is, with nothing queued (``POST /v1/studies/plan``)."""

    cells: list[PlannedCell]
    refused: int
    merged: int  # cells whose runs another cell's serve (equal networks run once)
    jobs: int
    estimated_jobs: int  # of them, the ones earlier runs of the same network, dataset and workers estimate
    cpu_hours: float | None  # the estimated jobs' seconds × CPUs (None when none is estimated)
    gpu_hours: float | None
    wall_s: float | None  # the estimated jobs alone on the service's slots, one after another in turn
    estimate: str  # what the figures rest on


class WebhookRequest(BaseModel):
    url: str = Field(min_length=1, max_length=2048)


class WebhookView(BaseModel):
    id: str
    url: str
    created_at: datetime


class WebhookCreated(WebhookView):
    secret: str  # shown once: the key of the HMAC-SHA256 in each delivery's X-San-Signature


class MoreSeeds(BaseModel):
    seeds: list[Seed] = Field(min_length=1, max_length=64)
