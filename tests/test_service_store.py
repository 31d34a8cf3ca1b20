"""The jobs store on SQLite and on a real PostgreSQL: queue order, compare-and-set transitions with timestamps,
idempotency keys under concurrency, ownership."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event

from service.store import GroupCommit, IdempotencyConflict, JobStore, StudyStore
from training.states import TRANSITIONS, WAITING, JobStatus

pytestmark = pytest.mark.timeout(300, method="thread")


SPEC = {"model": {"name": "lenet5"}, "training": {"epochs": 2}}


def test_jobs_are_queued_in_order_and_listed_newest_first_per_principal(store):
    made = [store.create("alice", {**SPEC, "n": n})[0] for n in range(3)] + [store.create("bob", SPEC)[0]]
    assert [job.status for job in made] == ["queued"] * 4
    assert [job.id for job in store.in_states(("queued",))] == [job.id for job in made]
    page, total = store.page("alice", limit=2)
    assert total == 3 and [job.spec["n"] for job in page] == [2, 1]
    assert [job.spec["n"] for job in store.page("alice", limit=2, offset=2)[0]] == [0]
    assert store.get(made[0].id, "bob") is None and store.get(made[0].id, "alice").id == made[0].id


def test_transitions_are_compare_and_set_and_timestamped(store):
    job, _ = store.create("alice", SPEC)
    assert not store.transition(job.id, "running")  # queued → running skips submitted: refused
    assert store.transition(job.id, "submitted")
    assert not store.transition(job.id, "submitted")  # the second claim loses
    assert store.transition(job.id, "running") and store.transition(job.id, "succeeded")
    assert not store.transition(job.id, "cancelled")  # terminal
    stored = store.get(job.id)
    assert [state for state, _ in stored.transitions] == ["queued", "submitted", "running", "succeeded"]
    times = [at for _, at in stored.transitions]
    assert times == sorted(times) and stored.at("running") == times[2]
    assert set(TRANSITIONS) == {"queued", "submitted", "running", "interrupted"}  # the terminal states lead nowhere
    assert [status.is_terminal() for status in JobStatus] == [False] * 4 + [True] * 3
    assert stored.status is JobStatus.SUCCEEDED and all(isinstance(s, JobStatus) for s, _ in stored.transitions)


def test_an_interrupted_job_waits_ahead_of_the_queue_and_is_claimed_once(store):
    first, _ = store.create("alice", SPEC)
    lost, _ = store.create("alice", SPEC)
    assert store.transition(lost.id, "submitted") and store.transition(lost.id, "running")
    assert not store.transition(first.id, "interrupted")  # only a job on Ray can be lost by Ray
    assert store.transition(lost.id, "interrupted", only_from=("running",))
    assert [job.id for job in store.in_states(WAITING)] == [lost.id, first.id]  # older, but behind the lost one
    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda _: store.transition(lost.id, "submitted", only_from=("interrupted",)), range(8)))
    assert wins.count(True) == 1
    states = [state for state, _ in store.get(lost.id).transitions]
    assert states == ["queued", "submitted", "running", "interrupted", "submitted"]


def test_concurrent_claims_of_one_queued_job_have_exactly_one_winner(store):
    job, _ = store.create("alice", SPEC)
    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda _: store.transition(job.id, "submitted"), range(16)))
    assert wins.count(True) == 1
    assert [state for state, _ in store.get(job.id).transitions] == ["queued", "submitted"]


def test_an_idempotency_key_gives_one_job_even_under_concurrency(store):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.create("alice", SPEC, "key-1"), range(16)))
    assert len({job.id for job, _ in results}) == 1
    assert [created for _, created in results].count(True) == 1
    assert store.create("bob", SPEC, "key-1")[1]  # keys are per principal
    assert store.create("bob", SPEC, "")[1] and store.create("bob", SPEC, "")[1]  # an empty key is no key
    with pytest.raises(IdempotencyConflict, match="different spec"):
        store.create("alice", {**SPEC, "training": {"epochs": 3}}, "key-1")
    assert store.page("alice")[1] == 1


def commits_of(store: JobStore) -> list[int]:
    commits = [0]
    event.listen(store.engine, "commit", lambda _connection: commits.__setitem__(0, commits[0] + 1))
    return commits


def test_requests_that_arrive_together_share_one_commit(store):
    new_jobs, commits = GroupCommit(store), commits_of(store)

    async def together(first: int, count: int):
        return await asyncio.gather(*(new_jobs.create("alice", {**SPEC, "n": n}) for n in range(first, first + count)))

    made = asyncio.run(together(0, 30))
    assert commits[0] == 1 and all(created for _, created in made)
    made += asyncio.run(together(30, 5))
    assert commits[0] == 2
    queued = store.in_states(("queued",))
    assert [job.spec["n"] for job in queued] == list(range(35))  # queue order = arrival order
    assert [job.id for job in queued] == [job.id for job, _ in made]
    assert all([state for state, _ in job.transitions] == ["queued"] for job in queued)


@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
def test_a_database_server_gets_one_transaction_at_a_time_and_the_requests_meanwhile_join_the_next(store):
    new_jobs, commits = GroupCommit(store), commits_of(store)
    in_flight, most = [0], [0]
    add = store.add

    def slow_add(jobs):  # the real write, after a slow round trip, so later requests arrive while it commits
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            time.sleep(0.5)
            add(jobs)
        finally:
            in_flight[0] -= 1

    store.add = slow_add

    async def in_waves():
        first = [asyncio.ensure_future(new_jobs.create("alice", {**SPEC, "n": n})) for n in range(5)]
        await asyncio.sleep(0.05)  # the first group's transaction is under way
        later = []
        for n in range(5, 20):
            later.append(asyncio.ensure_future(new_jobs.create("alice", {**SPEC, "n": n})))
            await asyncio.sleep(0.002)
        return await asyncio.gather(*first, *later)

    made = asyncio.run(in_waves())
    assert most[0] == 1
    assert commits[0] == 2  # the first 5, then the 15 that arrived during their commit
    assert [job.spec["n"] for job in store.in_states(("queued",))] == list(range(20))
    assert [job.id for job in store.in_states(("queued",))] == [job.id for job, _ in made]


def test_a_job_that_cannot_be_written_fails_alone(store):
    new_jobs = GroupCommit(store)

    async def together():
        specs = [{**SPEC, "n": 0}, {**SPEC, "n": object()}, {**SPEC, "n": 2}]  # the second is not JSON
        return await asyncio.gather(*(new_jobs.create("alice", spec) for spec in specs), return_exceptions=True)

    first, second, third = asyncio.run(together())
    assert isinstance(second, Exception) and "not JSON serializable" in str(second)
    assert [job.spec["n"] for job in store.in_states(("queued",))] == [0, 2] == [first[0].spec["n"], third[0].spec["n"]]


def test_a_cancel_that_read_the_job_as_queued_does_not_win_once_it_was_submitted(store):
    job, _ = store.create("alice", {"n": 1})
    stale = store.get(job.id)  # read as queued by a cancel…
    assert store.transition(job.id, "submitted", only_from=("queued",))  # …then the queue claims it
    assert stale.status == "queued"
    assert not store.transition(job.id, "cancelled", only_from=("queued",))  # so Dispatcher.cancel must stop it
    assert store.get(job.id).status == "submitted"
    assert store.transition(job.id, "cancelled")  # from submitted, as the Ray-stop path does


def test_a_study_and_its_children_are_written_together_and_read_in_queue_order(store):
    studies = StudyStore(store)
    children = [("c000", 0, {"n": 0}), ("c000", 1, {"n": 1}), ("c002", 0, {"n": 2})]
    study = studies.create("alice", "study-1", {"name": "s"}, None, "parent-run", children)
    assert study.status == "running" and studies.get("study-1", "bob") is None
    read = studies.children("study-1")
    assert [(c.cell, c.seed, c.job.spec["n"], c.job.status) for c in read] == [
        ("c000", 0, 0, "queued"), ("c000", 1, 1, "queued"), ("c002", 0, 2, "queued")]  # fmt: skip
    assert studies.finish("study-1", "cancelled") and not studies.finish("study-1", "succeeded")
    assert studies.get("study-1").status == "cancelled"
