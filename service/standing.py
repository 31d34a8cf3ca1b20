"""Where a waiting job stands and why. The dispatcher's tick — the one reader of the whole queue — ranks the waiting
jobs in the order it will submit them (`rank`: interrupted jobs first, then round-robin over principals, as
`service.queue.Dispatcher.next_job` picks) into a `Ranking`; a job's view reads its place there and says why it
waits, in numbers (`standing`): the service's slots, the jobs that go first, the cluster's CPUs — and whether the
cluster as it is could ever run it."""

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from service.estimates import History
from service.schemas import QueueStanding
from training.states import JobStatus

MAX_RANKED = 2000  # waiting jobs ranked per tick (oldest first): the cost of a tick stays bounded


@dataclass(frozen=True)
class Waiting:
    """A waiting job as ranking needs it."""

    id: str
    principal: str
    status: JobStatus
    seq: int


@dataclass
class Ranking:
    """The waiting jobs in submission order, as of one tick."""

    order: list[Waiting] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)  # principal → jobs on Ray (submitted or running)
    max_submitted: int = 0
    complete: bool = True  # every waiting job was ranked (else only the `MAX_RANKED` oldest)
    estimates: dict[str, tuple] = field(default_factory=dict)  # job id → seconds until it starts, until it ends
    history: History = field(default_factory=History)
    made_at: datetime | None = None
    place: dict[str, int] = field(init=False)  # job id → its index in `order`
    before: dict[str, tuple[int, int]] = field(init=False)  # job id → (its principal's, interrupted) jobs before it

    def __post_init__(self) -> None:
        self.place, self.before = {}, {}
        counts: dict[str, int] = {}
        resuming = 0
        for index, job in enumerate(self.order):  # once per tick, so that a view's reason costs O(1)
            self.place[job.id] = index
            self.before[job.id] = (counts.get(job.principal, 0), resuming)
            if job.status == JobStatus.INTERRUPTED:
                resuming += 1
            else:
                counts[job.principal] = counts.get(job.principal, 0) + 1


def rank(waiting: list[Waiting], running: list[str], served: dict[str, float], slots: int) -> list[Waiting]:
    """``waiting`` (in queue order) in the order the dispatcher submits them: the interrupted ones first, then each
    turn the head of line of the principal with the fewest jobs on Ray, served longest ago (never served first), the
    older head first among equals. ``running``: the principals of the jobs on Ray, oldest first — each pick beyond
    the ``slots`` waits for the oldest of them to end (the model behind a place: jobs end in the order they
    started), so with one slot the order is plain round-robin."""
    order = [job for job in waiting if job.status == JobStatus.INTERRUPTED]
    queues: dict[str, deque[Waiting]] = {}
    for job in waiting:
        if job.status == JobStatus.QUEUED:
            queues.setdefault(job.principal, deque()).append(job)
    on_ray = deque(running)
    for _ in order:  # the interrupted jobs take their slots first
        on_ray.append("")
    served, clock = dict(served), max(served.values(), default=0.0)
    while queues:
        while slots > 0 and len(on_ray) >= slots:
            on_ray.popleft()
        held = {principal: on_ray.count(principal) for principal in queues}
        principal = min(queues, key=lambda p: (held[p], served.get(p, -1.0), queues[p][0].seq))
        order.append(queues[principal].popleft())
        if not queues[principal]:
            del queues[principal]
        clock += 1.0  # served now: after every principal served before
        served[principal] = clock
        on_ray.append(principal)
    return order


def cpus_needed(scaling: dict[str, Any]) -> tuple[str, float, float]:
    """What a job's ``scaling`` asks of Ray: its shape in words, its CPUs and its GPUs."""
    workers, cpus = scaling["num_workers"], scaling["cpus_per_worker"]
    gpus = workers if scaling.get("use_gpu") else 0
    shape = f"{workers} worker{'s' * (workers != 1)} × {cpus:g} CPU" + (" + 1 GPU each" if gpus else "")
    return shape, workers * cpus, gpus


def never_fits(scaling: dict[str, Any], size: dict[str, float]) -> str | None:
    """Why a job of this ``scaling`` can never start on a cluster of ``size`` (its CPUs and GPUs in all), or None.
    Admission refuses such a job; a waiting one (admitted before the cluster shrank) says so in its standing."""
    shape, cpus, gpus = cpus_needed(scaling)
    if cpus <= size["CPU"] and gpus <= size.get("GPU", 0.0):
        return None
    have = f"{size['CPU']:g} CPUs" + (f" and {size.get('GPU', 0.0):g} GPUs" if gpus else "")
    return f"needs {shape} = {cpus:g} CPUs" + (f" + {gpus:g} GPUs" if gpus else "") + f", the cluster has {have}"


def standing(
    job_id: str,
    principal: str,
    status: JobStatus,
    spec: dict[str, Any],
    ranking: Ranking,
    size: dict[str, float] | None,
    free: dict[str, float] | None,
) -> QueueStanding | None:
    """Why ``job_id`` is not running yet (None once it runs or ended). ``size``/``free``: the cluster's CPUs and
    GPUs, in all and free now, as last asked of Ray (None while unknown)."""
    if status not in (JobStatus.QUEUED, JobStatus.INTERRUPTED, JobStatus.SUBMITTED):
        return None
    shape, cpus, _ = cpus_needed(spec["scaling"]) if "scaling" in spec else ("?", 0.0, 0.0)
    if size is not None and "scaling" in spec and (why := never_fits(spec["scaling"], size)):
        reason = f"it can never start on the cluster as it is: {why}"
        return QueueStanding(position=None, ahead=None, reason=reason, fits=False)
    if status == JobStatus.SUBMITTED:
        reason = f"on Ray, waiting for its resources: needs {shape} = {cpus:g} CPUs"
        if free is not None:
            reason += f"; Ray has {free['CPU']:g} CPU{'s' * (free['CPU'] != 1)} free"
        return QueueStanding(position=None, ahead=None, reason=reason, fits=True)
    place = ranking.place.get(job_id)
    if place is None:  # queued after the last tick, or past the ranked ones
        beyond = "" if ranking.complete else f"; more than {MAX_RANKED} jobs wait, and it is not among the oldest"
        return QueueStanding(position=None, ahead=None, reason=f"not ranked yet{beyond}", fits=True)
    ahead = place
    mine, resuming = ranking.before[job_id]
    reasons = []
    held, slots = sum(ranking.held.values()), ranking.max_submitted
    if slots == 0:
        reasons.append("the service submits no jobs now (SAN_MAX_SUBMITTED=0)")
    elif place < slots - held:
        reasons.append(f"{slots - held} of {slots} slots free: it is submitted at the next tick")
    else:
        reasons.append(f"{held} of {slots} slots held ({ranking.held.get(principal, 0)} by your jobs)")
    if ahead:
        parts = [f"{mine} yours", f"{ahead - mine - resuming} of other principals, in turn"]
        if resuming:
            parts.insert(0, f"{resuming} resuming after an interruption")
        jobs = "1 job goes" if ahead == 1 else f"{ahead} jobs go"
        reasons.append(f"{jobs} first ({', '.join(parts)})")
    start, end = ranking.estimates.get(job_id, (None, None))
    estimate = ranking.history.basis(spec)
    if start is None and end is None and ranking.history.duration(spec) is not None:
        estimate = "no estimate: a job before it has none (" + estimate + ")"
    made = ranking.made_at
    return QueueStanding(
        position=place + 1,
        ahead=ahead,
        reason="; ".join(reasons),
        fits=True,
        starts_at=made + timedelta(seconds=start) if made and start is not None else None,
        ends_at=made + timedelta(seconds=end) if made and end is not None else None,
        estimate=estimate,
    )
