"""Live events of a job or a study, as server-sent events (``GET /v1/jobs/{id}/events``,
``GET /v1/studies/{id}/events``): each state change (the store's job events), one event per epoch with its metrics
(the job's MLflow run), each line of the job's log (`training.driver_log`), then ``end`` once it ended and everything
before was sent. An event's id is the stream's cursor after it — ``<the last state change's seq>.<the last
epoch>.<the log's byte offset>`` — so a client that reconnects with ``Last-Event-ID`` (to any API process: the
cursor is in the store, MLflow and the log, not here) gets what it missed, once. A job resumed after a Ray head loss
logs into the same run and the same log, each epoch once: its stream goes on."""

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import TooMany, value_error
from service.progress import RunReader
from service.store import Job, JobStore, StudyStore
from training.driver_log import read_lines
from training.states import StudyStatus

log = logging.getLogger("san.service")
CURSOR = re.compile(r"(\d{1,18})\.(-1|\d{1,9})(?:\.(\d{1,15}))?")
STREAMS_RETRY_AFTER = {"Retry-After": "10"}


@dataclass
class Cursor:
    state: int = 0  # the seq of the last state change sent
    epoch: int = -1  # the last epoch sent
    log: int = 0  # the byte offset after the last log line sent

    @classmethod
    def parse(cls, text: str | None) -> "Cursor":
        if not text:
            return cls()
        match = CURSOR.fullmatch(text.strip())
        if match is None:
            raise value_error(f"Last-Event-ID {text[:40]!r} is not an id this stream sent", ("header", "last-event-id"))
        return cls(int(match[1]), int(match[2]), int(match[3] or 0))

    def __str__(self) -> str:
        return f"{self.state}.{self.epoch}.{self.log}"


def event(kind: str, cursor: Cursor, data: dict[str, Any]) -> dict[str, str]:
    return {"event": kind, "id": str(cursor), "data": json.dumps(data, default=str)}


class EventStreams:
    """The open streams (at most ``limit``: each polls the store, and MLflow while its job runs)."""

    def __init__(
        self,
        store: JobStore,
        studies: StudyStore,
        runs: RunReader,
        log_file: Callable[[str], Path],
        poll_s: float,
        limit: int = 64,
    ) -> None:
        self.store, self.studies, self.runs, self.poll_s, self.limit = store, studies, runs, poll_s, limit
        self.log_file = log_file  # a job's log (training.driver_log), by job id
        self.open = 0

    def check(self) -> None:
        """Before a stream's response starts: `TooMany` when ``limit`` are open."""
        if self.open >= self.limit:
            raise TooMany(f"{self.limit} event streams are open on this API process; retry later", STREAMS_RETRY_AFTER)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1

    async def job(self, job: Job, cursor: Cursor) -> AsyncIterator[dict[str, str]]:
        """A job's events from ``cursor`` on, until it ended and its last epoch was sent."""
        async with self.slot():
            while True:
                current = await asyncio.to_thread(self.store.get, job.id)
                if current is None:
                    return
                for seq, status, at in await asyncio.to_thread(self.store.events_after, job.id, cursor.state):
                    cursor.state = seq
                    yield event("state", cursor, {"job_id": job.id, "status": status, "at": at})
                for row in await self.epochs(current, cursor.epoch):
                    cursor.epoch = int(row["epoch"])
                    yield event("epoch", cursor, {"job_id": job.id, **row})
                while lines := await asyncio.to_thread(read_lines, self.log_file(job.id), cursor.log):
                    for line, cursor.log in lines:
                        yield event("log", cursor, {"job_id": job.id, "line": line})
                    if not current.status.is_terminal():
                        break  # a bounded read a poll; once the job ended, the rest of its log
                if current.status.is_terminal():  # read before its last events, epochs and lines: they were all sent
                    yield event("end", cursor, {"job_id": job.id, "status": current.status, "error": current.error})
                    return
                await asyncio.sleep(self.poll_s)

    async def epochs(self, job: Job, after: int) -> list[dict[str, Any]]:
        if job.mlflow_run_id is None:
            return []
        try:
            rows = await asyncio.to_thread(self.runs.history, job.spec["tracking"]["mlflow_uri"], job.mlflow_run_id)
        except Exception as error:  # MLflow away: the next poll tries again, the cursor unmoved
            log.warning("events of %s: %s", job.id, error)
            return []
        return [row for row in rows if row["epoch"] > after]

    async def study(self, study_id: str, cursor: Cursor) -> AsyncIterator[dict[str, str]]:
        """A study's children's state changes from ``cursor`` on, until the study ended."""
        async with self.slot():
            while True:
                current = await asyncio.to_thread(self.studies.get, study_id)
                if current is None:
                    return
                for seq, job_id, cell, seed, status, at in await asyncio.to_thread(
                    self.studies.events_after, study_id, cursor.state
                ):
                    cursor.state = seq
                    data = {"study_id": study_id, "job_id": job_id, "cell": cell, "seed": seed, "status": status}
                    yield event("state", cursor, {**data, "at": at})
                if current.status != StudyStatus.RUNNING:
                    yield event("end", cursor, {"study_id": study_id, "status": current.status})
                    return
                await asyncio.sleep(self.poll_s)
