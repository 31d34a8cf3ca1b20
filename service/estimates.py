"""When a waiting job starts and ends, from the jobs that ran before it: the seconds per epoch of the same network
(model, attention, placement), dataset and worker count — each earlier job's time from its last start to its end
over its epochs, the median of the newest `HISTORY` that succeeded — and the queue's order played forward on the
service's slots (`schedule`). No earlier run of a shape: "no estimate", said so, never a guess."""

import math
import statistics
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from service.store import Job
from training.states import JobStatus

HISTORY = 200  # the newest succeeded jobs a refresh reads
Shape = tuple[str, str, str, str, int]


def shape_of(spec: dict[str, Any]) -> Shape:
    model = spec.get("model", {})
    return (model.get("name", "?"), model.get("attention", "?"), model.get("placement", "?"),
            spec.get("data", {}).get("dataset", "?"), int(spec.get("scaling", {}).get("num_workers", 1)))  # fmt: skip


def describe(shape: Shape) -> str:
    name, attention, placement, dataset, workers = shape
    return f"{name} {attention} {placement} on {dataset} × {workers} worker{'s' * (workers != 1)}"


def epochs_of(spec: dict[str, Any]) -> int:
    return int(spec.get("training", {}).get("epochs", 1))


def pace_of(job: Job) -> float | None:
    """Seconds per epoch of a succeeded job: from its last start (its submission, if it ended before a tick saw it
    run) to its end, over its epochs."""
    started, ended = job.at(JobStatus.RUNNING) or job.at(JobStatus.SUBMITTED), job.at(JobStatus.SUCCEEDED)
    if started is None or ended is None or ended <= started:
        return None
    return (ended - started).total_seconds() / epochs_of(job.spec)


class History:
    """Seconds per epoch by shape, from finished jobs."""

    def __init__(self, finished: Iterable[Job] = ()) -> None:
        paces: dict[Shape, list[float]] = {}
        for job in finished:
            if (pace := pace_of(job)) is not None:
                paces.setdefault(shape_of(job.spec), []).append(pace)
        self.paces = {shape: statistics.median(found) for shape, found in paces.items()}
        self.runs = {shape: len(found) for shape, found in paces.items()}

    def duration(self, spec: dict[str, Any]) -> float | None:
        pace = self.paces.get(shape_of(spec))
        return None if pace is None else pace * epochs_of(spec)

    def basis(self, spec: dict[str, Any]) -> str:
        shape = shape_of(spec)
        if shape not in self.paces:
            return f"no estimate: no earlier run of {describe(shape)} succeeded"
        runs = self.runs[shape]
        return f"from {runs} earlier run{'s' * (runs != 1)} of {describe(shape)}: {self.paces[shape]:.1f} s per epoch"

    def remaining(self, job: Job, now: datetime) -> float | None:
        """Seconds until a job on Ray ends: its expected duration less the time since it last started."""
        duration = self.duration(job.spec)
        started = job.at(JobStatus.RUNNING) if job.status == JobStatus.RUNNING else None
        if duration is None:
            return None
        return max(0.0, duration - ((now - started).total_seconds() if started else 0.0))


def schedule(order: list[tuple[str, float | None]], busy: list[float | None], slots: int) -> dict[str, tuple]:
    """Seconds from now until each job of ``order`` (id, duration; in the order they are submitted) starts and
    ends, each taking the slot that frees first; ``busy``: the seconds left to each job holding a slot. A job
    whose slot frees at an unknown time, or whose own duration is unknown, gets None: so does every job that waits
    for its slot."""
    free = sorted(math.inf if left is None else left for left in busy)[:slots]
    free += [0.0] * (slots - len(free))
    found: dict[str, tuple] = {}
    for job_id, duration in order:
        if not free:
            found[job_id] = (None, None)
            continue
        start = min(free)
        end = math.inf if duration is None else start + duration
        free[free.index(start)] = end
        found[job_id] = (None if math.isinf(start) else start, None if math.isinf(end) else end)
    return found
