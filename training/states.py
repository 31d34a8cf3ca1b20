"""A job's states and the moves between them, spelled once: the store, the dispatcher, the mapping from Ray's and
MLflow's states, studies, the routes and the CLI all use these. Modelled on Ray's own ``JobStatus``
(``ray.dashboard.modules.job.common``: a str enum with ``is_terminal()``), with the two states only a queue in front
of Ray has: ``queued`` (waiting in the service's own queue) and ``interrupted`` (its cluster lost it; it goes back to
Ray ahead of the queue and resumes from its last checkpoint into the same MLflow run)."""

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    INTERRUPTED = "interrupted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in TERMINAL

    def can_move_to(self, to: "JobStatus") -> bool:
        return to in TRANSITIONS.get(self, frozenset())

    @classmethod
    def from_ray(cls, status: str) -> "JobStatus":
        """Ray's job status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) as the service names it."""
        return RAY_STATUS[status]

    @classmethod
    def from_mlflow(cls, status: str) -> "JobStatus":
        """An MLflow run's status (SCHEDULED, RUNNING, FINISHED, FAILED, KILLED) as a job's."""
        return MLFLOW_TO_JOB.get(status, cls.RUNNING)

    def mlflow_status(self) -> str:
        """The MLflow run status that ends a run in this (terminal) state."""
        return JOB_TO_MLFLOW[self]


ACTIVE = (JobStatus.SUBMITTED, JobStatus.RUNNING)  # on Ray
WAITING = (JobStatus.INTERRUPTED, JobStatus.QUEUED)  # in the service's queue, in the dispatcher's order
OPEN = (*WAITING, *ACTIVE)  # not yet ended: what a principal's share counts
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.SUBMITTED, JobStatus.CANCELLED}),
    # → queued or interrupted: Ray could not be reached to take it, it goes back in line
    JobStatus.SUBMITTED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.INTERRUPTED, *TERMINAL}),
    JobStatus.RUNNING: frozenset({JobStatus.INTERRUPTED, *TERMINAL}),
    JobStatus.INTERRUPTED: frozenset({JobStatus.SUBMITTED, JobStatus.FAILED, JobStatus.CANCELLED}),
}

RAY_STATUS = {
    "PENDING": JobStatus.SUBMITTED,
    "RUNNING": JobStatus.RUNNING,
    "SUCCEEDED": JobStatus.SUCCEEDED,
    "FAILED": JobStatus.FAILED,
    "STOPPED": JobStatus.CANCELLED,
}
MLFLOW_TO_JOB = {
    "SCHEDULED": JobStatus.QUEUED,
    "RUNNING": JobStatus.RUNNING,
    "FINISHED": JobStatus.SUCCEEDED,
    "FAILED": JobStatus.FAILED,
    "KILLED": JobStatus.CANCELLED,
}
JOB_TO_MLFLOW = {JobStatus.SUCCEEDED: "FINISHED", JobStatus.FAILED: "FAILED", JobStatus.CANCELLED: "KILLED"}


class StudyStatus(StrEnum):
    """A study runs until every child has ended, then takes the worst of their ends (failed, then cancelled)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self is not StudyStatus.RUNNING

    def mlflow_status(self) -> str:
        return JOB_TO_MLFLOW[JobStatus(self.value)]
