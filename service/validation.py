"""Checks a valid `JobSpec` must also pass to be admitted here: the service's limits, the cluster's size, and
data inside the data root. Each failure names its field, as pydantic's own errors do."""

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator

from service.errors import TooMany
from service.ray_jobs import RayJobs, RayRefused, RayUnavailable
from service.settings import ServiceSettings
from service.standing import never_fits
from service.store import JobStore, StudyStore
from training.config import JobSpec
from training.data.resolve import resolve_data
from training.states import OPEN

# Tag prefixes the service writes itself (a study's parent run and cell, the job's id): a spec that set them could
# file its runs into another principal's study.
RESERVED_TAG_PREFIXES = ("mlflow.", "san.")


class Rejected(ValueError):
    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc, self.message = loc, message

    def __reduce__(self):  # raised in the admission worker process, re-raised in the API's
        return type(self), (self.loc, self.message)

    def detail(self) -> list[dict]:
        return [{"loc": ["body", *self.loc], "msg": self.message, "type": "value_error"}]


class ClusterSize:
    """The cluster's CPUs and GPUs, in all and free, as last asked of Ray (None while unknown or Ray is down).
    `refresh` runs in the background (`run`), so admitting a job never waits on Ray."""

    def __init__(self, ray: RayJobs) -> None:
        self.ray = ray
        self.value: dict[str, float] | None = None
        self.free: dict[str, float] | None = None  # free now, for a waiting job's reason

    def refresh(self) -> None:
        try:
            size = self.ray.resources()
        except RayUnavailable:
            size = None
        try:
            self.free = self.ray.free() if size else None
        except (RayUnavailable, RayRefused):
            self.free = None
        # A head that has just started lists no live node's CPUs yet: that is "unknown", not "no room".
        self.value = size if size and size["CPU"] > 0 else None

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(interval_s if self.value is not None else min(interval_s, 1.0))


def reject_reserved_tags(tags: dict[str, str], loc: tuple[str, ...] = ("tracking", "tags")) -> None:
    for key in tags:
        if key.lower().startswith(RESERVED_TAG_PREFIXES):
            raise Rejected(
                (*loc, key),
                f"{'.'.join(loc)}: {key[:60]!r}: tags starting with "
                f"{' or '.join(repr(p) for p in RESERVED_TAG_PREFIXES)} are set by the service",
            )


def admit(
    spec: JobSpec,
    settings: ServiceSettings,
    size: dict[str, float] | None,
    own_tags: bool = False,
    params: int | None = None,
) -> JobSpec:
    """``spec`` as the job will run it — with the MLflow URI it will log to, the service's when the spec names
    none, else one its operator allowed — or `Rejected`. ``size``: the cluster's CPUs and GPUs (`ClusterSize`;
    None while unknown); ``own_tags``: the spec's tags were set by the service (a study's child); ``params``: the
    model's parameter count when counted elsewhere (`service.admission.ModelSizes`), else counted here."""
    if not own_tags:
        reject_reserved_tags(spec.tracking.tags)
    try:
        uri = settings.configured_mlflow_uri(spec.tracking.mlflow_uri)
    except ValueError as error:
        raise Rejected(("tracking", "mlflow_uri"), f"tracking.mlflow_uri: {error}") from None
    limits = (
        (("training", "epochs"), spec.training.epochs, settings.max_epochs),
        (("training", "batch_size"), spec.training.batch_size, settings.max_batch_size),
        (("scaling", "num_workers"), spec.scaling.num_workers, settings.max_workers),
    )
    for loc, value, limit in limits:
        if value > limit:
            raise Rejected(loc, f"{'.'.join(loc)} {value} is above this service's limit of {limit}")
    params = spec.model_params() if params is None else params  # on the meta device (cached)
    if params > settings.max_model_params:
        raise Rejected(("model",), f"model: {params:,} parameters is above this service's limit of "
                       f"{settings.max_model_params:,}")  # fmt: skip
    if size is not None and (why := never_fits(spec.scaling.model_dump(), size)):
        raise Rejected(("scaling", "num_workers"), f"scaling: {why}")
    try:
        resolve_data(spec, settings.data_root, build_missing=False)
    except ValueError as error:
        field = str(error).partition(": ")[0]
        loc = tuple(field.split(".")) if field.startswith(("data.", "training.")) else ("data",)
        raise Rejected(loc, str(error)) from None
    return spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"mlflow_uri": uri})})


def too_many(message: str, settings: ServiceSettings) -> TooMany:
    """429 for a principal over its share, saying which and when to try again."""
    return TooMany(message, headers={"Retry-After": str(settings.retry_after_s)})


class JobShares:
    """Each principal's jobs not yet ended, against ``max_jobs_per_principal``: the store's count, taken at most once
    every `REFRESH_S` per principal (one count in flight at a time), plus the jobs stored here since that count, plus
    the jobs of requests still being admitted (reserved until their commit, or their failure, settles them) — so
    neither a stale count nor requests in flight let a principal pass its share. A count per POST grows with the
    jobs the principal holds, and on the event loop it delays every other request. Other API replicas' admissions
    show at the next count. One study admission at a time per principal: a study's checks hold the admission
    worker, and a second one in flight would pass the running-studies count too."""

    REFRESH_S = 1.0

    def __init__(self, store: JobStore, settings: ServiceSettings) -> None:
        self.store, self.settings = store, settings
        self._held: dict[str, tuple[int, float]] = {}  # principal → (jobs the store holds, when counted)
        self._reserved: dict[str, int] = {}  # principal → jobs of requests in flight
        self._studies: set[str] = set()  # principals with a study being admitted
        self._counting: dict[str, asyncio.Future[tuple[int, float]]] = {}  # counts in flight, by principal
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, principal: str, adding: int) -> Iterator[None]:
        """Hold ``adding`` jobs of the principal's share while the block admits and stores them, or `too_many`.
        Counts in the store in this thread when the count is stale."""
        self._reserve(principal, adding, self._fresh(principal) or self._count(principal))
        with self._settled(principal, adding):
            yield

    @contextlib.asynccontextmanager
    async def reserve_on_loop(self, principal: str, adding: int) -> AsyncIterator[None]:
        """`reserve` from the event loop: no thread hop while the count is fresh (almost every POST), a count across
        the network (PostgreSQL) in a thread, one at a time (the requests meanwhile wait for the same one)."""
        held = self._fresh(principal)
        if held is None and self.store.local:
            held = self._count(principal)
        elif held is None:
            pending = self._counting.get(principal)
            if pending is None:
                pending = self._counting[principal] = asyncio.ensure_future(asyncio.to_thread(self._count, principal))
                pending.add_done_callback(lambda _: self._counting.pop(principal, None))
            counted = await asyncio.shield(pending)  # a waiter that goes away does not cancel the others' count
            held = self._fresh(principal) or counted  # with what the requests before this one stored since
        self._reserve(principal, adding, held)
        with self._settled(principal, adding):
            yield

    @contextlib.contextmanager
    def admitting_study(self, principal: str, studies: StudyStore) -> Iterator[None]:
        """One study admission at a time per principal, and no more running studies than its share, or `too_many`."""
        with self._lock:
            busy = principal in self._studies
            self._studies.add(principal)
        if busy:
            raise too_many(f"a study of {principal}'s is being admitted; one at a time", self.settings)
        try:
            running = studies.count_running(principal)
            if running >= self.settings.max_studies_per_principal:
                raise too_many(
                    f"{principal} has {running} studies running, this service's limit a principal "
                    f"(SAN_MAX_STUDIES_PER_PRINCIPAL)",
                    self.settings,
                )
            yield
        finally:
            with self._lock:
                self._studies.discard(principal)

    def release(self, principal: str, ended: int) -> None:
        """``ended`` of the principal's jobs ended here (cancelled): their places are free before the next count."""
        with self._lock:
            if principal in self._held:
                held, counted = self._held[principal]
                self._held[principal] = (max(0, held - ended), counted)

    def _fresh(self, principal: str) -> tuple[int, float] | None:
        with self._lock:
            found = self._held.get(principal)
        return found if found is not None and time.monotonic() - found[1] <= self.REFRESH_S else None

    def _count(self, principal: str) -> tuple[int, float]:
        return self.store.count(OPEN, principal), time.monotonic()

    def _reserve(self, principal: str, adding: int, counted: tuple[int, float]) -> None:
        limit = self.settings.max_jobs_per_principal
        with self._lock:
            held, at = counted
            current = self._held.get(principal)
            if current is None or current[1] <= at:  # a newer count than the one kept
                self._held[principal] = counted
            else:
                held, at = current
            reserved = self._reserved.get(principal, 0)
            if held + reserved + adding > limit:
                message = (
                    f"{principal} has {held + reserved} jobs not yet ended; {adding} more would pass this "
                    f"service's limit of {limit} a principal (SAN_MAX_JOBS_PER_PRINCIPAL)"
                )
            else:
                message = None
                self._reserved[principal] = reserved + adding
        if message:
            raise too_many(message, self.settings)

    @contextlib.contextmanager
    def _settled(self, principal: str, adding: int) -> Iterator[None]:
        """The reservation ends with the block: stored (counted as held until the next count) or not."""
        stored = False
        try:
            yield
            stored = True
        finally:
            with self._lock:
                self._reserved[principal] = self._reserved.get(principal, 0) - adding
                if stored and principal in self._held:
                    held, at = self._held[principal]
                    self._held[principal] = (held + adding, at)
