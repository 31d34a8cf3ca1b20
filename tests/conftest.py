"""Fixtures shared by the test modules: the job store on SQLite and on one real PostgreSQL server per session."""

import pytest

from service.store import JobStore
from tests.services import Postgres


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
