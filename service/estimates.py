"""When a waiting job starts and ends, from the jobs that ran before it: the start-up seconds and the seconds per
epoch of the same network (model, attention, placement), dataset and worker count — each earlier job's time from
its last submission until it ran, and from then to its end over its epochs, the medians of the newest `HISTORY`
that succeeded — and the queue's order played forward on the service's slots (`schedule`). No earlier run of a
shape: "no estimate", said so, never a guess."""

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
    return (
        model.get("name", "?"),
        model.get("attention", "?"),
        model.get("placement", "?"),
        spec.get("data", {}).get("dataset", "?"),
        int(spec.get("scaling", {}).get("num_workers", 1)),
    )


def describe(shape: Shape) -> str:
    name, attention, placement, dataset, workers = shape
    return f"{name} {attention} {placement} on {dataset} × {workers} worker{'s' * (workers != 1)}"


def epochs_of(spec: dict[str, Any]) -> int:
    return int(spec.get("training", {}).get("epochs", 1))


def timing_of(job: Job) -> tuple[float, float] | None:
    """What a succeeded job took, from its last submission: seconds until it ran (Ray's start-up: the driver, the
    workers) and seconds per epoch after that (a job that ended before a tick saw it run: all of it epochs)."""
    submitted, ended = job.at(JobStatus.SUBMITTED), job.at(JobStatus.SUCCEEDED)
    running = job.at(JobStatus.RUNNING)
    if submitted is None or ended is None or ended <= submitted:
        return None
    if running is None or not submitted <= running <= ended:
        running = submitted
    return (running - submitted).total_seconds(), (ended - running).total_seconds() / epochs_of(job.spec)


class History:
    """Start-up seconds and seconds per epoch by shape (the medians), from finished jobs: a job's time on a slot
    is its start-up plus its epochs at that pace."""

    def __init__(self, finished: Iterable[Job] = ()) -> None:
        found: dict[Shape, list[tuple[float, float]]] = {}
        for job in finished:
            if (timing := timing_of(job)) is not None:
                found.setdefault(shape_of(job.spec), []).append(timing)
        self.startup = {shape: statistics.median(t[0] for t in timings) for shape, timings in found.items()}
        self.paces = {shape: statistics.median(t[1] for t in timings) for shape, timings in found.items()}
        self.runs = {shape: len(timings) for shape, timings in found.items()}

    def duration(self, spec: dict[str, Any]) -> float | None:
        """Seconds on a slot, from submission to the end."""
        shape = shape_of(spec)
        return None if shape not in self.paces else self.startup[shape] + self.paces[shape] * epochs_of(spec)

    def basis(self, spec: dict[str, Any]) -> str:
        shape = shape_of(spec)
        if shape not in self.paces:
            return f"no estimate: no earlier run of {describe(shape)} succeeded"
        runs = self.runs[shape]
        return (
            f"from {runs} earlier run{'s' * (runs != 1)} of {describe(shape)}: {self.startup[shape]:.1f} s to "
            f"start, {self.paces[shape]:.1f} s per epoch"
        )

    def remaining(self, job: Job, now: datetime) -> float | None:
        """Seconds until a job on Ray ends: its expected time on the slot less the time since its last submission."""
        duration, submitted = self.duration(job.spec), job.at(JobStatus.SUBMITTED)
        if duration is None:
            return None
        return max(0.0, duration - ((now - submitted).total_seconds() if submitted else 0.0))


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
