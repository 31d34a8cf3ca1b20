"""The dispatcher over the real store (SQLite and PostgreSQL) with Ray stood in for by a recorder — the queue's rules
are the subject here; the real Ray path is tests/test_service_ray.py. Issue 24: a cancel can never wedge the queue,
and principals are served round-robin, so one principal's study cannot hold everyone's queue."""

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import inspect

from service.estimates import History, schedule
from service.queue import Dispatcher
from service.ray_jobs import RayJobInfo, RayUnavailable
from service.settings import ServiceSettings
from service.standing import Ranking, never_fits, standing
from service.store import Job, JobStore, StudyStore, new_job
from service.studies import StudyFinisher, expand_stored
from training.driver_report import write_report
from training.states import JobStatus

SPEC = {"training": {"epochs": 1}}


class RecordingRay:
    """Ray as the dispatcher sees it: submissions recorded in order, states set by the test."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.reports: dict[str, Path] = {}  # where each job's driver would report
        self.states: dict[str, JobStatus] = {}
        self.on_submit = None  # called with the job id before the submit answers

    def submit(self, job_id: str, spec_path: Path, report: Path) -> None:
        if self.on_submit is not None:
            self.on_submit(job_id)
        self.submitted.append(job_id)
        self.reports[job_id] = report
        self.states[job_id] = JobStatus.RUNNING

    def info(self, job_id: str) -> RayJobInfo | None:
        return RayJobInfo(self.states[job_id], "Ray's message") if job_id in self.states else None

    def stop(self, job_id: str) -> None:
        self.states[job_id] = JobStatus.CANCELLED

    def finish(self, job_id: str, status: JobStatus = JobStatus.SUCCEEDED) -> None:
        self.states[job_id] = status


def dispatcher(store: JobStore, tmp_path: Path, ray: RecordingRay, max_submitted: int = 1) -> Dispatcher:
    return Dispatcher(store, ray, tmp_path / "jobs", max_submitted)  # type: ignore[arg-type]


def add(store: JobStore, principal: str, count: int = 1) -> list[str]:
    return add_spec(store, principal, SPEC, count)


def add_spec(store: JobStore, principal: str, spec: dict, count: int = 1) -> list[str]:
    jobs = [new_job(principal, spec) for _ in range(count)]
    store.add(jobs)
    return [job.id for job in jobs]


def test_a_second_principal_is_served_before_the_first_principals_study_goes_on(store, tmp_path):
    """Issue 24's must-show: A queues a 40-job study, then B one job, one job on Ray at a time → B's job starts
    before A's third (on b867172 the FIFO ran all 40 of A's first: B's job was the 41st)."""
    ray = RecordingRay()
    queue = dispatcher(store, tmp_path, ray)
    studies = StudyStore(store)
    studies.create("alice", "study-a", {"name": "a"}, None, "run-a", [(f"c{i:03d}", 0, SPEC) for i in range(40)])
    queue.tick()
    (bobs,) = add(store, "bob")
    for _ in range(4):  # each job ends, the next tick reconciles it and submits the next
        ray.finish(ray.submitted[-1])
        queue.tick()
    alices = [child.job.id for child in studies.children("study-a")]
    assert ray.submitted[:2] == [alices[0], bobs]
    assert ray.submitted.index(bobs) < ray.submitted.index(alices[2])
    assert ray.submitted[2:] == alices[1:4]  # then A's, in their order


def test_with_room_for_two_each_principal_gets_one_slot_in_turn(store, tmp_path):
    ray = RecordingRay()
    queue = dispatcher(store, tmp_path, ray, max_submitted=2)
    alices = add(store, "alice", 5)
    bobs = add(store, "bob", 2)
    carols = add(store, "carol", 1)
    queue.tick()
    assert set(ray.submitted) == {alices[0], bobs[0]}  # two slots, two principals — not alice's first two
    ray.finish(alices[0])
    queue.tick()
    assert ray.submitted[-1] == carols[0]  # never served, none on Ray: before alice (just served) and bob (one on Ray)


def test_a_waiting_job_with_its_cancel_asked_for_ends_cancelled_and_the_next_job_starts(store, tmp_path):
    """However it came to be (an API killed between a cancel's two writes; made here by hand in the store), a queued
    job with ``cancel_requested`` is cancelled at the next tick and never holds the queue (on b867172 `fill` fetched
    it as the one job there was room for, skipped it, and submitted nothing, restart included)."""
    ray = RecordingRay()
    first, second = add(store, "alice", 2)
    store.update(first, cancel_requested=True)
    dispatcher(store, tmp_path, ray).tick()
    assert store.get(first).status == "cancelled"
    assert ray.submitted == [second] and first not in ray.states
    assert store.get(second).status == "submitted"


def test_a_cancel_that_races_a_submit_failing_on_ray_still_cancels_and_the_queue_goes_on(store, tmp_path):
    """The cancel reads the job as submitted; the submit fails (Ray unreachable) and puts it back in line; the cancel
    then finds it waiting (on b867172 it did nothing there: the job waited with its flag, and blocked the queue)."""
    ray = RecordingRay()
    queue = dispatcher(store, tmp_path, ray)
    job_id, after = add(store, "alice", 2)
    cancelling: list[threading.Thread] = []

    def fail_while_cancelled(submitted: str) -> None:
        ray.on_submit = None
        cancel = threading.Thread(target=queue.cancel, args=(store.get(submitted),))
        cancel.start()  # it sets the flag, finds the job submitted, and waits for the tick's lock
        cancelling.append(cancel)
        deadline = time.monotonic() + 10
        while not store.get(submitted).cancel_requested and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # its compare-and-set from a waiting state has failed: the job is still submitted
        raise RayUnavailable("connection refused")

    ray.on_submit = fail_while_cancelled
    queue.tick()
    cancelling[0].join(10)
    assert store.get(job_id).status == "cancelled"
    queue.tick()
    assert ray.submitted == [after]


def test_a_claimed_job_whose_owner_cancelled_it_is_not_submitted_again_on_reconcile(store, tmp_path):
    """Claimed (submitted) but Ray never got it — the API stopped in between — and cancelled meanwhile: the restarted
    dispatcher ends it cancelled instead of sending it to Ray (on b867172 it resubmitted it)."""
    ray = RecordingRay()
    (job_id,) = add(store, "alice")
    assert store.transition(job_id, "submitted", only_from=("queued",))
    store.update(job_id, cancel_requested=True)
    dispatcher(store, tmp_path, ray).tick()
    assert store.get(job_id).status == "cancelled" and ray.submitted == []


def test_an_interrupted_job_still_goes_back_ahead_of_every_principals_queue(store, tmp_path):
    ray = RecordingRay()
    (queued,) = add(store, "bob")
    (lost,) = add(store, "alice")
    assert store.transition(lost, "submitted") and store.transition(lost, "interrupted")
    dispatcher(store, tmp_path, ray).tick()
    assert ray.submitted == [lost] and store.get(queued).status == "queued"


def test_a_database_made_before_summaries_gets_the_column_and_its_studies_summaries(tmp_path):
    """An existing database (no ``summary`` column, no share index) opens with both added; its studies' summaries
    are made by the finisher's pass, never by a read."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = JobStore(url)
    with old.engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX jobs_by_principal_and_status")
        connection.exec_driver_sql("ALTER TABLE studies DROP COLUMN summary")
    old.close()
    spec = {
        "name": "old",
        "seeds": [0],
        "axes": {"model.attention": ["none", "san-c"], "model.placement": ["bottleneck", "full"]},
    }
    store = JobStore(url)
    try:
        assert "jobs_by_principal_and_status" in {i["name"] for i in inspect(store.engine).get_indexes("jobs")}
        studies = StudyStore(store)
        studies.create("alice", "study-old", spec, None, "run-old", [("c000", 0, SPEC)])  # no summary, as then
        assert studies.get("study-old").summary is None
        expansions = SimpleNamespace(of=lambda study: expand_stored(json.dumps(study.spec), study.id, None))
        finisher = StudyFinisher(studies, ServiceSettings(), expansions)  # type: ignore[arg-type]
        finisher.summarise()
        # none runs once for both placements, and LeNet-5's two san-c placements are one network
        assert studies.get("study-old").summary == {"cells": 4, "refused": 0, "merged": 2}
        assert studies.unsummarised(10) == [] and not finisher.summarised
        finisher.summarise()
        assert finisher.summarised  # none left: the later passes ask no more
    finally:
        store.close()


def test_the_drivers_report_is_what_the_record_learns_its_run_and_its_failure_from(store, tmp_path):
    """Issue 25: one channel from the driver — its MLflow run id as soon as it has one, why it failed at the end —
    read by the dispatcher's tick alone; Ray's own message only when the driver said nothing."""
    ray = RecordingRay()
    queue = dispatcher(store, tmp_path, ray, max_submitted=2)
    reported, silent = add(store, "alice", 2)
    queue.tick()
    assert ray.submitted == [reported, silent] and ray.reports[reported].name == "report.json"
    write_report(ray.reports[reported], mlflow_run_id="a" * 32)
    queue.tick()
    assert store.get(reported).mlflow_run_id == "a" * 32 and store.get(silent).mlflow_run_id is None
    write_report(ray.reports[reported], error="ValueError: the driver's own words")
    ray.finish(reported, JobStatus.FAILED)
    ray.finish(silent, JobStatus.FAILED)
    queue.tick()
    failed = store.get(reported)
    assert (failed.status, failed.error, failed.mlflow_run_id) == (
        "failed",
        "ValueError: the driver's own words",
        "a" * 32,
    )
    assert store.get(silent).error == "Ray's message"


def test_each_waiting_jobs_place_and_reason_hold_at_every_step_until_it_is_submitted(store, tmp_path):
    """Issue 28: the order the views give is the order the dispatcher submits in — interrupted first, then
    round-robin — and each waiting job's reason counts the slots and the jobs ahead, checked after every tick."""
    ray = RecordingRay()
    queue = dispatcher(store, tmp_path, ray)
    alices, bobs, carols = add(store, "alice", 3), add(store, "bob", 2), add(store, "carol", 1)
    (lost,) = add(store, "bob")
    assert store.transition(lost, "submitted") and store.transition(lost, "interrupted")
    queue.tick()
    predicted = [lost, *[job.id for job in queue.ranking.order]]  # the lost job was submitted by that tick
    assert ray.submitted == [lost]
    assert sorted(predicted) == sorted([*alices, *bobs, *carols, lost])
    owner = {job_id: "alice" for job_id in alices} | {job_id: "bob" for job_id in [*bobs, lost]} | {carols[0]: "carol"}
    for step in range(1, len(predicted)):
        waiting = predicted[step:]
        for place, job_id in enumerate(waiting):
            job = store.get(job_id)
            shown = standing(job.id, job.principal, job.status, job.spec, queue.ranking, None, None)
            ahead = waiting[:place]
            mine = sum(owner[other] == owner[job_id] for other in ahead)
            assert (shown.position, shown.ahead, shown.fits) == (place + 1, place, True)
            held_by_them = int(owner[ray.submitted[-1]] == owner[job_id])
            assert shown.reason.startswith(f"1 of 1 slots held ({held_by_them} by your jobs)"), shown.reason
            if ahead:
                assert f"; {place} job{'s' * (place != 1)} go" in shown.reason
                assert f"({mine} yours, {place - mine} of other principals, in turn)" in shown.reason
        ray.finish(ray.submitted[-1])
        queue.tick()
        assert ray.submitted[-1] == predicted[step]  # the next submitted is the one placed first
    assert ray.submitted == predicted and queue.ranking.order == []


def test_what_can_never_fit_is_one_answer_for_admission_and_the_queue():
    cpu_only = {"num_workers": 2, "cpus_per_worker": 1.5, "use_gpu": False}
    assert never_fits(cpu_only, {"CPU": 3.0}) is None
    assert never_fits(cpu_only, {"CPU": 2.0}) == "needs 2 workers × 1.5 CPU = 3 CPUs, the cluster has 2 CPUs"
    on_gpus = {"num_workers": 2, "cpus_per_worker": 1, "use_gpu": True}
    assert never_fits(on_gpus, {"CPU": 8.0, "GPU": 2.0}) is None
    assert never_fits(on_gpus, {"CPU": 8.0, "GPU": 1.0}) == (
        "needs 2 workers × 1 CPU + 1 GPU each = 2 CPUs + 2 GPUs, the cluster has 8 CPUs and 1 GPUs"
    )
    assert never_fits(on_gpus, {"CPU": 8.0}) is not None  # a cluster without GPUs


def test_a_job_the_cluster_cannot_hold_says_so_and_one_on_ray_says_what_it_waits_for():
    spec = {"scaling": {"num_workers": 3, "cpus_per_worker": 1, "use_gpu": False}}
    queued = standing("job-a", "alice", JobStatus.QUEUED, spec, Ranking(), {"CPU": 2.0, "GPU": 0.0}, None)
    assert queued.fits is False and queued.position is None
    assert queued.reason == (
        "it can never start on the cluster as it is: needs 3 workers × 1 CPU = 3 CPUs, the cluster has 2 CPUs"
    )
    spec["scaling"]["num_workers"] = 2
    on_ray = standing("job-a", "alice", JobStatus.SUBMITTED, spec, Ranking(), {"CPU": 2.0}, {"CPU": 1.0, "GPU": 0.0})
    assert (
        on_ray.fits
        and on_ray.reason == "on Ray, waiting for its resources: needs 2 workers × 1 CPU = 2 CPUs; Ray has 1 CPU free"
    )
    assert standing("job-a", "alice", JobStatus.RUNNING, spec, Ranking(), None, None) is None
    idle = standing("job-a", "alice", JobStatus.QUEUED, spec, Ranking(max_submitted=0), None, None)
    assert idle.reason == "not ranked yet"  # queued after the last tick


def test_the_schedule_plays_the_order_forward_on_the_slots_and_an_unknown_blocks_what_waits_behind_it():
    order = [("a", 10.0), ("b", None), ("c", 5.0)]
    assert schedule(order, [3.0, None], slots=2) == {"a": (3.0, 13.0), "b": (13.0, None), "c": (None, None)}
    assert schedule(order, [3.0, None], slots=3) == {"a": (0.0, 10.0), "b": (3.0, None), "c": (10.0, 15.0)}
    assert schedule(order, [], slots=0) == {"a": (None, None), "b": (None, None), "c": (None, None)}


def finished_job(spec: dict, seconds: float, startup_s: float = 5.0) -> Job:
    """Submitted, running ``startup_s`` later, succeeded ``seconds`` after that."""
    job = new_job("alice", spec)
    submitted = datetime(2026, 12, 7, tzinfo=UTC)
    running = submitted + timedelta(seconds=startup_s)
    job.transitions = [
        (JobStatus.SUBMITTED, submitted),
        (JobStatus.RUNNING, running),
        (JobStatus.SUCCEEDED, running + timedelta(seconds=seconds)),
    ]
    job.status = JobStatus.SUCCEEDED
    return job


def test_history_is_the_median_seconds_per_epoch_of_the_same_network_dataset_and_workers():
    lenet = {
        "model": {"name": "lenet5", "attention": "san-c", "placement": "bottleneck"},
        "data": {"dataset": "fashion-mnist"},
        "scaling": {"num_workers": 2},
        "training": {"epochs": 4},
    }
    wider = {**lenet, "scaling": {"num_workers": 1}}
    history = History([finished_job(lenet, seconds) for seconds in (40, 80, 400)] + [finished_job(wider, 8)])
    assert history.duration({**lenet, "training": {"epochs": 10}}) == pytest.approx(5 + 200.0)  # median 20 s × 10
    assert history.duration(wider) == pytest.approx(5 + 8.0)
    assert (
        history.basis(lenet) == "from 3 earlier runs of lenet5 san-c bottleneck on fashion-mnist × 2 workers: "
        "5.0 s to start, 20.0 s per epoch"
    )
    other = {**lenet, "model": {**lenet["model"], "attention": "cbam"}}
    assert history.duration(other) is None
    assert (
        history.basis(other) == "no estimate: no earlier run of lenet5 cbam bottleneck on fashion-mnist × "
        "2 workers succeeded"
    )


def test_waiting_jobs_get_start_and_end_estimates_from_the_jobs_that_ran_before(store, tmp_path):
    ray = RecordingRay()
    queue = dispatcher(store, tmp_path, ray)
    known = {**SPEC, "model": {"name": "lenet5"}}
    (first,) = add_spec(store, "alice", known)
    queue.tick()
    queue.tick()  # it runs
    time.sleep(0.2)
    ray.finish(first)
    queue.tick()  # it ends: the history has its pace
    pace = History([store.get(first)]).duration(known)
    assert pace is not None and pace > 0
    running, second = add_spec(store, "alice", known, 2)
    (unknown,) = add_spec(store, "alice", {**SPEC, "model": {"name": "vgg16"}})
    (third,) = add_spec(store, "alice", known)
    queue.tick()
    assert ray.submitted[-1] == running and [job.id for job in queue.ranking.order] == [second, unknown, third]
    views = {
        job_id: standing(job_id, "alice", JobStatus.QUEUED, store.get(job_id).spec, queue.ranking, None, None)
        for job_id in (second, unknown, third)
    }
    assert views[second].estimate.startswith("from 1 earlier run of lenet5")
    assert views[unknown].starts_at == views[second].ends_at and views[unknown].ends_at is None
    assert views[unknown].estimate.startswith("no estimate: no earlier run of vgg16")
    assert views[third].starts_at is None and views[third].estimate.startswith("no estimate: a job before it")
    made = queue.ranking.made_at
    left = queue.ranking.estimates[second][0]  # what is left of the running job, submitted by this tick
    assert 0 <= left <= pace and views[second].starts_at == made + timedelta(seconds=left)
    assert (views[second].ends_at - views[second].starts_at).total_seconds() == pytest.approx(pace)
