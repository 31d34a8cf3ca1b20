"""Fixtures shared by the test modules: the job store on SQLite and on one real PostgreSQL server per session, and
the API in process (`InProcessService`): the real app and store over an ASGI transport, no uvicorn — the HTTP
layer is the subject; uvicorn itself is `tests.services.Service`, for the end-to-end tier."""

import logging
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import hash_token
from service.settings import ServiceSettings
from service.store import JobStore
from tests.services import TOKENS, Postgres

# The end-to-end files, slowest first (seconds each, one at a time, on this 2-core machine: 350, 320, 210, 150, 120,
# 75, 50). xdist hands out whole files in collection order: started first, they run beside each other and the small
# files fill the gaps, instead of the two slowest landing last, on one worker.
SLOWEST_FIRST = (
    "test_service_ray",
    "test_training_ray",
    "test_demo",
    "test_local_stack",
    "test_service_failures",
    "test_training_cancel",
    "test_cli",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1]
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def postgres_url():
    server = Postgres()
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    sqlite = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = JobStore(sqlite if request.param == "sqlite" else request.getfixturevalue("postgres_url"))
    yield store
    if request.param == "postgresql":  # one database for the module: empty it between tests
        with store.engine.begin() as connection:
            connection.exec_driver_sql("TRUNCATE study_jobs, studies, job_events, jobs")
    store.close()


class SharedTransport(httpx.BaseTransport):
    """The started app's one transport, for many clients (one per principal): closing a client leaves it open."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.inner.handle_request(request)

    def close(self) -> None:
        pass


class InProcessService:
    """`create_app` with ``settings`` (as ``SAN_*`` would set them), its lifespan run once by `start`: the same
    interface as `tests.services.Service` (``client(who)``, ``stop``), without a server process."""

    def __init__(self, root: Path, **settings) -> None:
        self.root = root
        tokens = {who: hash_token(token) for who, token in TOKENS.items()}
        defaults = {"storage_root": root / "runs", "data_root": root / "data", "poll_interval_s": 0.5}
        self.settings = ServiceSettings(tokens=tokens, **{**defaults, **settings})
        self.app = create_app(self.settings)
        self.test_client: TestClient | None = None

    def start(self) -> "InProcessService":
        # raise_server_exceptions=False: an unhandled error is the 500 a user would see, which tests assert against
        self.test_client = TestClient(self.app, raise_server_exceptions=False)
        self.test_client.__enter__()
        return self

    def stop(self) -> None:
        if self.test_client is not None:
            self.test_client.__exit__(None, None, None)
            self.test_client = None

    def restart(self) -> None:
        """A new app (a new process would be the same) over the same settings and database."""
        self.stop()
        self.app = create_app(self.settings)
        self.start()

    @property
    def parts(self):
        return self.app.state.parts

    def client(self, who: str | None = "alice") -> httpx.Client:
        headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
        transport = SharedTransport(self.test_client._transport)
        return httpx.Client(transport=transport, base_url="http://testserver", headers=headers, timeout=60)


class TracebackRecords(logging.Handler):
    """Every log record that carries an exception's traceback, from any logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """A factory of started in-process services for one module, all stopped at its end — and none may have logged a
    traceback meanwhile (what `tests.services.Service`'s callers check in its log)."""
    started: list[InProcessService] = []
    tracebacks = TracebackRecords()
    logging.getLogger().addHandler(tracebacks)

    def start(**settings) -> InProcessService:
        service = InProcessService(tmp_path_factory.mktemp("api"), **settings).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()
    logging.getLogger().removeHandler(tracebacks)
    assert not tracebacks.records, [tracebacks.format(record) for record in tracebacks.records]
