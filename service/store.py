"""The jobs table (SQLAlchemy 2): SQLite by default, PostgreSQL by URL. Every state change is a compare-and-set
on the current state, recorded with its time in ``job_events``, so concurrent writers never both win."""

import asyncio
import contextlib
import functools
import json
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Row, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from training.states import ACTIVE, WAITING, JobStatus, StudyStatus


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("principal", "idempotency_key", name="one_job_per_key"),
        Index("jobs_by_principal_and_status", "principal", "status"),
    )  # a principal's share, counted

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # queue order
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    principal: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JobEvent(Base):
    __tablename__ = "job_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookRow(Base):
    """A principal's webhook: where its jobs' and studies' transitions are POSTed, signed with ``secret``."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    principal: Mapped[str] = mapped_column(String(200), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeliveryRow(Base):
    """The outbox: one transition for one webhook, written in the transaction that made the transition."""

    __tablename__ = "webhook_deliveries"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    error: Mapped[str | None] = mapped_column(String(500), nullable=True)  # the last attempt's
    abandoned: Mapped[bool] = mapped_column(Boolean, default=False)


def enqueue(session: Session, principal: str, payload: dict[str, Any], moment: datetime) -> None:
    """A delivery of ``payload`` to each of ``principal``'s webhooks, in the caller's transaction."""
    for webhook_id in session.scalars(select(WebhookRow.id).where(WebhookRow.principal == principal)):
        session.add(DeliveryRow(webhook_id=webhook_id, payload=payload, attempts=0, next_at=moment))


class StudyRow(Base):
    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("principal", "idempotency_key", name="one_study_per_key"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    principal: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # What the expansion said at creation (cells, refused, merged): a read never expands the study again.
    summary: Mapped[dict[str, int] | None] = mapped_column(JSON(none_as_null=True), nullable=True)


# Columns added after a table was first created: (table, column, SQL type). `create_all` makes missing tables only.
ADDED_COLUMNS = (("studies", "summary", "JSON"),)


class StudyJobRow(Base):
    """A study's child: a job of the jobs table, with the cell and seed it stands for."""

    __tablename__ = "study_jobs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    cell: Mapped[str] = mapped_column(String(16))
    seed: Mapped[int] = mapped_column(Integer)


@dataclass
class Study:
    id: str
    principal: str
    status: StudyStatus
    spec: dict[str, Any]
    idempotency_key: str | None
    mlflow_run_id: str | None
    cancel_requested: bool
    error: str | None
    created_at: datetime
    updated_at: datetime
    summary: dict[str, int] | None = None


@dataclass(frozen=True)
class StudyChild:
    cell: str
    seed: int
    job: "Job"


@dataclass
class Job:
    """A job as read: detached from any session."""

    id: str
    principal: str
    status: JobStatus
    spec: dict[str, Any]
    idempotency_key: str | None
    cancel_requested: bool
    mlflow_run_id: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    transitions: list[tuple[JobStatus, datetime]] = field(default_factory=list)

    @property
    def reached_ray(self) -> bool:
        """Whether the job was ever submitted (its id is then Ray's submission id)."""
        return any(state == JobStatus.SUBMITTED for state, _ in self.transitions)

    def at(self, status: JobStatus) -> datetime | None:
        return next((at for state, at in reversed(self.transitions) if state == status), None)


def aware(moment: datetime) -> datetime:  # SQLite hands back naive datetimes
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _study(row: StudyRow) -> Study:
    return Study(
        row.id,
        row.principal,
        StudyStatus(row.status),
        row.spec,
        row.idempotency_key,
        row.mlflow_run_id,
        row.cancel_requested,
        row.error,
        aware(row.created_at),
        aware(row.updated_at),
        row.summary,
    )


def _job(row: JobRow | Row, events: Sequence[JobEvent | Row]) -> Job:
    return Job(
        row.id,
        row.principal,
        JobStatus(row.status),
        row.spec,
        row.idempotency_key,
        row.cancel_requested,
        row.mlflow_run_id,
        row.error,
        aware(row.created_at),
        aware(row.updated_at),
        [(JobStatus(e.status), aware(e.at)) for e in events],
    )


# The hot paths' statements, built once with the values as parameters: building and cache-keying a statement per
# call (``insert(...).values(...)``, an ORM session's select) cost more than SQLite's work (a POST's insert: 0.37 vs
# 0.13 ms; a GET's read: 0.38 ms through the ORM).
INSERT_JOB, INSERT_EVENT = insert(JobRow), insert(JobEvent)
JOB_BY_ID = select(JobRow.__table__).where(JobRow.id == bindparam("job_id"))
OWN_JOB_BY_ID = JOB_BY_ID.where(JobRow.principal == bindparam("principal"))
EVENTS_OF_JOB = select(JobEvent.__table__).where(JobEvent.job_id == bindparam("job_id")).order_by(JobEvent.seq)


def new_job(principal: str, spec: dict[str, Any], idempotency_key: str | None = None) -> Job:
    """A queued job as it will be stored (see `JobStore.add`)."""
    moment = now()
    return Job(
        f"job-{uuid.uuid4().hex[:16]}",
        principal,
        JobStatus.QUEUED,
        spec,
        idempotency_key,
        False,
        None,
        None,
        moment,
        moment,
        [(JobStatus.QUEUED, moment)],
    )


class IdempotencyConflict(ValueError):
    """The same Idempotency-Key was used before with a different spec."""


def same_spec(kind: str, found, spec: dict[str, Any]):
    """``found`` (a job or study an Idempotency-Key made before) when it was made with ``spec``; else the conflict."""
    if json.dumps(found.spec, sort_keys=True) != json.dumps(spec, sort_keys=True):
        raise IdempotencyConflict(f"Idempotency-Key {found.idempotency_key!r} was used for {kind} {found.id} "
                                  "with a different spec")  # fmt: skip
    return found


class JobStore:
    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
            database = make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine = create_engine(url, **kwargs)
        # A local SQLite file answers in microseconds, so its calls may run on the event loop (a thread hop costs
        # more: see GroupCommit); a database across the network (PostgreSQL) must never block the loop.
        self.local = url.startswith("sqlite")
        if self.local:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        # SQLite allows one writer; a thread that finds the file locked sleeps in SQLite's busy handler (up to
        # 100 ms at a time). Queueing this process's writers on a lock wakes each as soon as the last commits.
        self._write_lock = threading.Lock() if url.startswith("sqlite") else None
        Base.metadata.create_all(self.engine)
        self._add_columns()
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def _add_columns(self) -> None:
        """The columns a database made by an earlier version lacks (nullable, so old rows stay valid)."""
        found = inspect(self.engine)
        with self.engine.begin() as connection:
            for table, column, kind in ADDED_COLUMNS:
                if column not in {c["name"] for c in found.get_columns(table)}:
                    connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
            for index in JobRow.__table__.indexes:  # create_all makes a table's indexes only with the table
                index.create(connection, checkfirst=True)

    def _writing(self):
        return self._write_lock if self._write_lock is not None else contextlib.nullcontext()

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(select(1))

    def create(self, principal: str, spec: dict[str, Any], idempotency_key: str | None = None) -> tuple[Job, bool]:
        """A new queued job, or — for an Idempotency-Key this principal used before — the job it made then."""
        idempotency_key = idempotency_key or None  # an empty key is no key
        if idempotency_key:
            existing = self._by_key(principal, idempotency_key)
            if existing:
                return self._same_spec(existing, spec), False
        job = new_job(principal, spec, idempotency_key)
        try:
            self.add([job])
        except IntegrityError:  # a concurrent request with the same key won the insert
            existing = self._by_key(principal, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return self._same_spec(existing, spec), False
        return job, True

    def add(self, jobs: Sequence[Job]) -> None:
        """New queued jobs (from `new_job`), in this order, in one transaction."""
        with self._writing(), self.engine.begin() as connection:
            self.insert(connection, jobs)

    @staticmethod
    def insert(connection: Connection, jobs: Sequence[Job]) -> None:
        """New queued jobs and their first event, inside the caller's transaction (the hot path: Core, statements
        built once)."""
        if not jobs:  # an empty parameter list would insert one row of defaults
            return
        rows = [{"id": job.id, "principal": job.principal, "status": JobStatus.QUEUED, "spec": job.spec,
                 "idempotency_key": job.idempotency_key, "cancel_requested": False, "created_at": job.created_at,
                 "updated_at": job.created_at} for job in jobs]  # fmt: skip
        connection.execute(INSERT_JOB, rows)
        connection.execute(
            INSERT_EVENT, [{"job_id": job.id, "status": JobStatus.QUEUED, "at": job.created_at} for job in jobs]
        )

    @staticmethod
    def _same_spec(job: Job, spec: dict[str, Any]) -> Job:
        return same_spec("job", job, spec)

    def _by_key(self, principal: str, key: str) -> Job | None:
        with self.session() as session:
            row = session.scalar(select(JobRow).where(JobRow.principal == principal, JobRow.idempotency_key == key))
            return self._read(session, row) if row else None

    @staticmethod
    def _read(session: Session, row: JobRow) -> Job:
        return JobStore._read_all(session, [row])[0]

    @staticmethod
    def _read_all(session: Session, rows: Sequence[JobRow]) -> list[Job]:
        """The rows with their events, in one more query (not one per job)."""
        events: dict[str, list[JobEvent]] = {row.id: [] for row in rows}
        if rows:
            query = select(JobEvent).where(JobEvent.job_id.in_(list(events))).order_by(JobEvent.seq)
            for event in session.scalars(query):
                events[event.job_id].append(event)
        return [_job(row, events[row.id]) for row in rows]

    def get(self, job_id: str, principal: str | None = None) -> Job | None:
        """The job, or None when it does not exist or (with ``principal``) belongs to someone else."""
        query, params = (JOB_BY_ID, {"job_id": job_id}) if principal is None else \
            (OWN_JOB_BY_ID, {"job_id": job_id, "principal": principal})  # fmt: skip
        with self.engine.connect() as connection:
            row = connection.execute(query, params).first()
            return _job(row, connection.execute(EVENTS_OF_JOB, {"job_id": job_id}).all()) if row else None

    def page(self, principal: str | None = None, status: JobStatus | None = None, limit: int = 50,
             offset: int = 0) -> tuple[list[Job], int]:  # fmt: skip
        """Newest first, with the total count of matching jobs."""
        with self.session() as session:
            query = select(JobRow)
            if principal is not None:
                query = query.where(JobRow.principal == principal)
            if status is not None:
                query = query.where(JobRow.status == status)
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(query.order_by(JobRow.seq.desc()).limit(limit).offset(offset)).all()
            return self._read_all(session, rows), total

    def in_states(self, states: tuple[JobStatus, ...], limit: int | None = None) -> list[Job]:
        """By the order of ``states``, then oldest first: the queue's order."""
        order = case({state: rank for rank, state in enumerate(states)}, value=JobRow.status)
        with self.session() as session:
            query = select(JobRow).where(JobRow.status.in_(states)).order_by(order, JobRow.seq).limit(limit)
            return self._read_all(session, session.scalars(query).all())

    def count(self, states: tuple[JobStatus, ...], principal: str | None = None) -> int:
        query = select(func.count()).where(JobRow.status.in_(states))
        if principal is not None:
            query = query.where(JobRow.principal == principal)
        with self.session() as session:
            return session.scalar(query) or 0

    def cancel_requested_waiting(self) -> list[str]:
        """Waiting jobs whose cancel was asked for: however they came to still wait (a cancel that raced a failed
        submit, an API that died between a cancel's two writes), they must end cancelled, never hold the queue."""
        query = select(JobRow.id).where(JobRow.status.in_(WAITING), JobRow.cancel_requested.is_(True))
        with self.session() as session:
            return list(session.scalars(query.order_by(JobRow.seq)))

    def queue_heads(self) -> list[Job]:
        """Each principal's oldest queued job that no cancel was asked for: one row per principal."""
        first = (
            select(func.min(JobRow.seq))
            .where(JobRow.status == JobStatus.QUEUED, JobRow.cancel_requested.is_(False))
            .group_by(JobRow.principal)
        )
        with self.session() as session:
            rows = session.scalars(select(JobRow).where(JobRow.seq.in_(first)).order_by(JobRow.seq)).all()
            return self._read_all(session, rows)

    def waiting(self, limit: int) -> list[tuple[str, str, JobStatus, int]]:
        """(id, principal, status, seq) of the oldest ``limit`` waiting jobs no cancel was asked for."""
        query = (
            select(JobRow.id, JobRow.principal, JobRow.status, JobRow.seq)
            .where(JobRow.status.in_(WAITING), JobRow.cancel_requested.is_(False))
            .order_by(JobRow.seq)
            .limit(limit)
        )
        with self.session() as session:
            return [(id_, principal, JobStatus(status), seq) for id_, principal, status, seq in session.execute(query)]

    def specs_of(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self.session() as session:
            return dict(session.execute(select(JobRow.id, JobRow.spec).where(JobRow.id.in_(job_ids))).all())

    def recent(self, status: JobStatus, limit: int) -> list[Job]:
        """The newest ``limit`` jobs in ``status``."""
        with self.session() as session:
            query = select(JobRow).where(JobRow.status == status).order_by(JobRow.seq.desc()).limit(limit)
            return self._read_all(session, session.scalars(query).all())

    def events_after(self, job_id: str, after: int, limit: int = 500) -> list[tuple[int, JobStatus, datetime]]:
        """The job's state changes stored after event ``after`` (its seq), oldest first."""
        query = (
            select(JobEvent.seq, JobEvent.status, JobEvent.at)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after)
            .order_by(JobEvent.seq)
            .limit(limit)
        )
        with self.session() as session:
            return [(seq, JobStatus(status), aware(at)) for seq, status, at in session.execute(query)]

    def active_principals(self) -> list[str]:
        """The principal of each job on Ray, oldest job first (at most ``max_submitted`` rows, by the queue)."""
        query = select(JobRow.principal).where(JobRow.status.in_(ACTIVE)).order_by(JobRow.seq)
        with self.session() as session:
            return list(session.scalars(query))

    def active_by_principal(self) -> dict[str, int]:
        query = select(JobRow.principal, func.count()).where(JobRow.status.in_(ACTIVE)).group_by(JobRow.principal)
        with self.session() as session:
            return {principal: count for principal, count in session.execute(query)}

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        only_from: tuple[JobStatus, ...] | None = None,
        unless_cancel_requested: bool = False,
        **fields: Any,
    ) -> bool:
        """Move the job to ``to`` if its current state allows it (and is one of ``only_from``, when given, and no
        cancel was asked for, with ``unless_cancel_requested``): compare-and-set; False if another writer moved it
        first or the move is not allowed. ``fields``: error, mlflow_run_id."""
        to = JobStatus(to)
        allowed = [state for state in map(JobStatus, only_from or JobStatus) if state.can_move_to(to)]
        moment = now()
        where = [JobRow.id == job_id, JobRow.status.in_(allowed)]
        if unless_cancel_requested:
            where.append(JobRow.cancel_requested.is_(False))
        with self._writing(), self.session.begin() as session:
            changed = session.execute(
                update(JobRow).where(*where).values(status=to, updated_at=moment, **fields).returning(JobRow.principal)
            ).first()
            if changed:
                session.add(JobEvent(job_id=job_id, status=to, at=moment))
                event = {"kind": "job", "job_id": job_id, "status": to.value, "at": moment.isoformat()}
                if fields.get("error"):
                    event["error"] = fields["error"]
                enqueue(session, changed.principal, event, moment)
        return changed is not None

    def update(self, job_id: str, **fields: Any) -> None:
        """Fields that are not a state change: cancel_requested, mlflow_run_id."""
        with self._writing(), self.session.begin() as session:
            session.execute(update(JobRow).where(JobRow.id == job_id).values(updated_at=now(), **fields))


T = TypeVar("T")


def newest(rows: Sequence[T], key: Callable[[T], Any]) -> list[T]:
    """Of the rows (oldest first) with the same ``key``, the last; in the order of the ones kept."""
    kept: dict[Any, T] = {}
    for row in rows:
        kept.pop(key(row), None)
        kept[key(row)] = row
    return list(kept.values())


class StudyStore:
    """Studies and their children, in the jobs' database: a study's children are ordinary queued jobs (the same
    durable queue), linked to it with their cell and seed, all written in one transaction with the study."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    def create(
        self,
        principal: str,
        study_id: str,
        spec: dict[str, Any],
        idempotency_key: str | None,
        mlflow_run_id: str,
        children: Sequence[tuple[str, int, dict[str, Any]]],
        summary: dict[str, int] | None = None,
    ) -> Study:
        """``children``: (cell, seed, job spec) in queue order; ``summary``: what the expansion said (cells, refused,
        merged). Raises IntegrityError when the key was taken."""
        moment = now()
        study = Study(
            study_id,
            principal,
            StudyStatus.RUNNING,
            spec,
            idempotency_key or None,
            mlflow_run_id,
            False,
            None,
            moment,
            moment,
            summary,
        )
        jobs = [new_job(principal, child_spec) for _, _, child_spec in children]
        links = [
            {"job_id": job.id, "study_id": study_id, "cell": cell, "seed": seed}
            for job, (cell, seed, _) in zip(jobs, children, strict=True)
        ]
        with self.jobs._writing(), self.jobs.engine.begin() as connection:
            connection.execute(insert(StudyRow), [asdict(study)])
            JobStore.insert(connection, jobs)
            if links:
                connection.execute(insert(StudyJobRow), links)
        return study

    def get(self, study_id: str, principal: str | None = None) -> Study | None:
        with self.jobs.session() as session:
            query = select(StudyRow).where(StudyRow.id == study_id)
            if principal is not None:
                query = query.where(StudyRow.principal == principal)
            row = session.scalar(query)
            return _study(row) if row else None

    def by_key(self, principal: str, key: str) -> Study | None:
        with self.jobs.session() as session:
            row = session.scalar(select(StudyRow).where(StudyRow.principal == principal,
                                                        StudyRow.idempotency_key == key))  # fmt: skip
            return _study(row) if row else None

    def page(self, principal: str, limit: int = 50, offset: int = 0) -> tuple[list[Study], int]:
        with self.jobs.session() as session:
            query = select(StudyRow).where(StudyRow.principal == principal)
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(query.order_by(StudyRow.seq.desc()).limit(limit).offset(offset)).all()
            return [_study(row) for row in rows], total

    def unsummarised(self, limit: int) -> list[Study]:
        with self.jobs.session() as session:
            query = select(StudyRow).where(StudyRow.summary.is_(None)).order_by(StudyRow.seq).limit(limit)
            return [_study(row) for row in session.scalars(query)]

    def set_summary(self, study_id: str, summary: dict[str, int]) -> None:
        with self.jobs._writing(), self.jobs.session.begin() as session:
            session.execute(update(StudyRow).where(StudyRow.id == study_id).values(summary=summary))

    def count_running(self, principal: str) -> int:
        query = select(func.count()).where(StudyRow.principal == principal, StudyRow.status == StudyStatus.RUNNING)
        with self.jobs.session() as session:
            return session.scalar(query) or 0

    def child_states(self, study_ids: Sequence[str]) -> dict[str, list[tuple[str, str, str]]]:
        """Each study's children as (cell, job id, state), in queue order: one query for a whole page of studies."""
        found: dict[str, list[tuple[str, str, str]]] = {study_id: [] for study_id in study_ids}
        if not study_ids:
            return found
        query = (
            select(StudyJobRow.study_id, StudyJobRow.cell, StudyJobRow.seed, JobRow.id, JobRow.status)
            .join(JobRow, JobRow.id == StudyJobRow.job_id)
            .where(StudyJobRow.study_id.in_(list(study_ids)))
            .order_by(JobRow.seq)
        )
        with self.jobs.session() as session:
            rows = newest(session.execute(query).all(), lambda row: (row[0], row[1], row[2]))
        for study_id, cell, _, job_id, status in rows:
            found[study_id].append((cell, job_id, status))
        return found

    def events_after(
        self, study_id: str, after: int, limit: int = 500
    ) -> list[tuple[int, str, str, int, JobStatus, datetime]]:
        """Its children's state changes stored after event ``after``, oldest first: (seq, job id, cell, seed,
        state, at)."""
        query = (
            select(JobEvent.seq, JobEvent.job_id, StudyJobRow.cell, StudyJobRow.seed, JobEvent.status, JobEvent.at)
            .join(StudyJobRow, StudyJobRow.job_id == JobEvent.job_id)
            .where(StudyJobRow.study_id == study_id, JobEvent.seq > after)
            .order_by(JobEvent.seq)
            .limit(limit)
        )
        with self.jobs.session() as session:
            rows = session.execute(query)
            return [(seq, job, cell, seed, JobStatus(status), aware(at)) for seq, job, cell, seed, status, at in rows]

    def in_state(self, status: StudyStatus) -> list[Study]:
        with self.jobs.session() as session:
            rows = session.scalars(select(StudyRow).where(StudyRow.status == status).order_by(StudyRow.seq)).all()
            return [_study(row) for row in rows]

    def children(self, study_id: str) -> list[StudyChild]:
        """The newest job of each (cell, seed) — a retried cell's earlier job is history — in queue order, with
        each job's current state."""
        with self.jobs.session() as session:
            query = (select(StudyJobRow, JobRow).join(JobRow, JobRow.id == StudyJobRow.job_id)
                     .where(StudyJobRow.study_id == study_id).order_by(JobRow.seq))  # fmt: skip
            pairs = newest(session.execute(query).all(), lambda pair: (pair[0].cell, pair[0].seed))
            jobs = JobStore._read_all(session, [job for _, job in pairs])
            return [StudyChild(link.cell, link.seed, job) for (link, _), job in zip(pairs, jobs, strict=True)]

    def add_children(
        self,
        study_id: str,
        principal: str,
        children: Sequence[tuple[str, int, dict[str, Any]]],
        spec: dict[str, Any] | None = None,
    ) -> None:
        """More children — a cell run again, more seeds (with the study's ``spec`` that names them) — queued, and
        the study running again, in one transaction."""
        jobs = [new_job(principal, child_spec) for _, _, child_spec in children]
        links = [
            {"job_id": job.id, "study_id": study_id, "cell": cell, "seed": seed}
            for job, (cell, seed, _) in zip(jobs, children, strict=True)
        ]
        values: dict[str, Any] = {
            "status": StudyStatus.RUNNING,
            "cancel_requested": False,
            "error": None,
            "updated_at": now(),
        }
        if spec is not None:
            values["spec"] = spec
        with self.jobs._writing(), self.jobs.engine.begin() as connection:
            JobStore.insert(connection, jobs)
            connection.execute(insert(StudyJobRow), links)
            connection.execute(update(StudyRow).where(StudyRow.id == study_id).values(**values))

    def finish(
        self, study_id: str, status: StudyStatus, error: str | None = None, table: dict[str, Any] | None = None
    ) -> bool:
        """``running`` → ``status`` (compare-and-set: one finisher wins); its webhooks get the ``table``."""
        moment = now()
        with self.jobs._writing(), self.jobs.session.begin() as session:
            changed = session.execute(
                update(StudyRow)
                .where(StudyRow.id == study_id, StudyRow.status == StudyStatus.RUNNING)
                .values(status=status, error=error, updated_at=moment)
                .returning(StudyRow.principal)
            ).first()
            if changed:
                event = {
                    "kind": "study",
                    "study_id": study_id,
                    "status": StudyStatus(status).value,
                    "at": moment.isoformat(),
                    "error": error,
                    "table": table,
                }
                enqueue(session, changed.principal, event, moment)
            return changed is not None

    def request_cancel(self, study_id: str) -> None:
        with self.jobs._writing(), self.jobs.session.begin() as session:
            session.execute(update(StudyRow).where(StudyRow.id == study_id)
                            .values(cancel_requested=True, updated_at=now()))  # fmt: skip


class GroupCommit:
    """New jobs from requests that arrive together, written in one transaction: on the event loop for a local
    SQLite file, in a thread for PostgreSQL (whose round trips must not hold the loop), one transaction at a time
    (while one commits, the next group gathers: POST p99 at 50 clients 53–55 ms → 33–37 ms, against transactions
    that overlapped and contended for the server's connections and the GIL).

    Each `create` waits for the commit that holds its job, so a 201 still means "stored". Under load the loop
    has many POSTs ready at once, and one transaction for all of them costs little more than one for a single
    job (bench/api_latency.py at 50 clients: 17 jobs a commit on average; the server's CPU time per POST fell
    from 0.81 to 0.50 ms). A request with an Idempotency-Key takes `JobStore.create`'s own path: it must first
    look for the job its key made before.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.waiting: list[tuple[Job, asyncio.Future[None]]] = []
        self.writing: asyncio.Task | None = None  # the transaction in flight (held: the loop keeps weak references)

    async def create(
        self, principal: str, spec: dict[str, Any], idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        if idempotency_key:
            if self.store.local:
                return self.store.create(principal, spec, idempotency_key)
            return await asyncio.to_thread(self.store.create, principal, spec, idempotency_key)
        job = new_job(principal, spec)
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()
        self.waiting.append((job, stored))
        if len(self.waiting) == 1:  # the first of a group: commit once the requests ready now have joined it
            loop.call_soon(self._commit)
        await stored
        return job, True

    def _commit(self) -> None:
        if self.store.local:
            group, self.waiting = self.waiting, []
            self._answer(group, self._write(group))
            return
        if self.writing is not None:  # one transaction at a time: requests arriving meanwhile form the next group
            return
        group, self.waiting = self.waiting, []
        self.writing = asyncio.get_running_loop().create_task(asyncio.to_thread(self._write, group))
        self.writing.add_done_callback(functools.partial(self._written, group))

    def _written(self, group: list[tuple[Job, asyncio.Future[None]]], task: asyncio.Task) -> None:
        self.writing = None
        try:
            errors = task.result()
        except Exception as error:  # the thread itself failed: every job of its group is answered with that
            errors = [error] * len(group)
        self._answer(group, errors)
        if self.waiting:
            self._commit()

    def _write(self, group: list[tuple[Job, asyncio.Future[None]]]) -> list[Exception | None]:
        try:
            self.store.add([job for job, _ in group])
            return [None] * len(group)
        except Exception:  # one job must not fail the others: write each alone, each answered on its own
            return [self._add_alone(job) for job, _ in group]

    @staticmethod
    def _answer(group: list[tuple[Job, asyncio.Future[None]]], errors: list[Exception | None]) -> None:
        for (_, stored), error in zip(group, errors, strict=True):
            if stored.done():  # its request was cancelled (the client went away)
                continue
            if error is None:
                stored.set_result(None)
            else:
                stored.set_exception(error)

    def _add_alone(self, job: Job) -> Exception | None:
        try:
            self.store.add([job])
        except Exception as error:
            return error
        return None


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets readers proceed while a writer commits; NORMAL sync is durable across process crashes.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@dataclass(frozen=True)
class Webhook:
    id: str
    principal: str
    url: str
    created_at: datetime


@dataclass(frozen=True)
class Delivery:
    seq: int
    webhook_id: str
    url: str
    secret: str
    payload: dict[str, Any]
    attempts: int


class WebhookStore:
    """Webhooks and their outbox, in the jobs' database (the outbox rows are written with the transitions)."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    def create(self, principal: str, url: str, secret: str) -> Webhook:
        hook = WebhookRow(
            id=f"hook-{uuid.uuid4().hex[:16]}", principal=principal, url=url, secret=secret, created_at=now()
        )
        with self.jobs._writing(), self.jobs.session.begin() as session:
            session.add(hook)
        return Webhook(hook.id, principal, url, aware(hook.created_at))

    def count(self, principal: str) -> int:
        with self.jobs.session() as session:
            return session.scalar(select(func.count()).where(WebhookRow.principal == principal)) or 0

    def of(self, principal: str) -> list[Webhook]:
        query = select(WebhookRow).where(WebhookRow.principal == principal).order_by(WebhookRow.created_at)
        with self.jobs.session() as session:
            return [Webhook(r.id, r.principal, r.url, aware(r.created_at)) for r in session.scalars(query)]

    def delete(self, webhook_id: str, principal: str) -> bool:
        """The webhook and its undelivered events; False when the principal has no such webhook."""
        with self.jobs._writing(), self.jobs.session.begin() as session:
            owned = select(WebhookRow.id).where(WebhookRow.id == webhook_id, WebhookRow.principal == principal)
            if session.scalar(owned) is None:
                return False
            session.execute(delete(DeliveryRow).where(DeliveryRow.webhook_id == webhook_id))
            session.execute(delete(WebhookRow).where(WebhookRow.id == webhook_id))
        return True

    def due(self, moment: datetime, limit: int = 50) -> list[Delivery]:
        """Each webhook's oldest delivery not yet made (nor abandoned), if its time has come: one at a time per
        webhook, so each receiver sees its events in order and a failing one holds up only itself."""
        oldest = (
            select(func.min(DeliveryRow.seq))
            .where(DeliveryRow.delivered_at.is_(None), DeliveryRow.abandoned.is_(False))
            .group_by(DeliveryRow.webhook_id)
        )
        query = (
            select(DeliveryRow, WebhookRow.url, WebhookRow.secret)
            .join(WebhookRow, WebhookRow.id == DeliveryRow.webhook_id)
            .where(DeliveryRow.seq.in_(oldest), DeliveryRow.next_at <= moment)
            .order_by(DeliveryRow.seq)
            .limit(limit)
        )
        with self.jobs.session() as session:
            return [
                Delivery(row.seq, row.webhook_id, url, secret, row.payload, row.attempts)
                for row, url, secret in session.execute(query)
            ]

    def delivered(self, seq: int) -> None:
        with self.jobs._writing(), self.jobs.session.begin() as session:
            session.execute(update(DeliveryRow).where(DeliveryRow.seq == seq).values(delivered_at=now(), error=None))

    def failed(self, seq: int, attempts: int, next_at: datetime | None, error: str) -> None:
        """Another failed attempt: tried again at ``next_at``, or abandoned (None)."""
        values = {"attempts": attempts, "error": error[:500], "abandoned": next_at is None}
        if next_at is not None:
            values["next_at"] = next_at
        with self.jobs._writing(), self.jobs.session.begin() as session:
            session.execute(update(DeliveryRow).where(DeliveryRow.seq == seq).values(**values))
