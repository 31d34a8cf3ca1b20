"""/v1/studies against the API in process with no job leaving the queue (limit 0) and no Ray:
admission (422 naming the axis, nothing queued), ownership, idempotency, the table so far, cancel → the study
ends cancelled and its MLflow parent run KILLED; and property-based study specs that never get a 5xx."""

import math
import os
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from san.catalog import MODELS
from service.estimates import History
from tests.services import free_port
from tests.test_service_limits import rss_mib
from tests.test_service_queue import finished_job
from training.config import JobSpec
from training.states import JobStatus

pytestmark = pytest.mark.timeout(300, method="thread")

BASE = {"model": {"name": "lenet5"}, "training": {"epochs": 2, "batch_size": 32}, "lr": {"peak_epoch": 1}}
STUDY = {"name": "small", "base": BASE, "seeds": [0, 1],
         "axes": {"model.attention": ["none", "san-c"], "model.placement": ["bottleneck", "full"]}}  # fmt: skip


@pytest.fixture(scope="module")
def service(in_process):
    return in_process(
        max_submitted=0,
        ray_address=f"http://127.0.0.1:{free_port()}",
        max_epochs=100,
        max_study_cells=12,
        max_studies_per_principal=1000,
    )


def total_jobs(client) -> int:
    return client.get("/v1/jobs").json()["total"]


def test_a_study_queues_one_job_per_network_and_seed_under_an_mlflow_parent_run(service):
    with service.client("alice") as alice, service.client("bob") as bob:
        before = total_jobs(alice)
        created = alice.post("/v1/studies", json=STUDY)
        assert created.status_code == 201, created.text
        study = created.json()
        assert created.headers["location"] == f"/v1/studies/{study['id']}"
        # lenet5: none and san-c each run once for both placements, × 2 seeds
        assert study["status"] == "running" and study["jobs"] == {"queued": 4} and len(study["job_ids"]) == 4
        assert study["cells"] == {"done": 0, "running": 0, "queued": 2, "failed": 0, "cancelled": 0}
        assert study["merged_cells"] == 2 and study["refused_cells"] == 0
        assert total_jobs(alice) == before + 4
        child = alice.get(f"/v1/jobs/{study['job_ids'][1]}").json()
        tags = child["spec"]["tracking"]["tags"]
        assert tags == {"san.study_id": study["id"], "san.cell": "c000", "san.seed": "1",
                        "mlflow.parentRunId": study["mlflow_run_id"]}  # fmt: skip
        assert child["spec"]["tracking"]["run_name"] == "lenet5-none-bottleneck-s1"
        uri = child["spec"]["tracking"]["mlflow_uri"]
        parent = MlflowClient(uri).get_run(study["mlflow_run_id"])
        assert parent.info.status == "RUNNING" and parent.data.tags["san.study_id"] == study["id"]
        experiment = MlflowClient(uri).get_experiment(parent.info.experiment_id)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        for method, suffix in (("GET", ""), ("GET", "/table"), ("POST", "/cancel")):
            assert bob.request(method, f"/v1/studies/{study['id']}{suffix}").status_code == 404, suffix
        assert bob.get("/v1/studies").json()["total"] == 0
        shown = alice.get(f"/v1/studies/{study['id']}").json()
        assert [c["runs_as"] for c in shown["table"]["cells"]] == ["c000", "c000", "c002", "c002"]
        markdown = alice.get(f"/v1/studies/{study['id']}/table", params={"format": "md"})
        assert markdown.headers["content-type"].startswith("text/markdown")
        assert "| Base Model | … | … |" in markdown.text and "| SAN-c | … | … |" in markdown.text
        csv = alice.get(f"/v1/studies/{study['id']}/table", params={"format": "csv"}).text.splitlines()
        assert csv[0].startswith("cell,labels,runs_as") and len(csv) == 5
        assert alice.get(f"/v1/studies/{study['id']}/table", params={"format": "xml"}).status_code == 422


def test_a_plan_counts_cells_and_jobs_and_costs_them_from_earlier_runs_with_nothing_queued(service):
    dispatcher = service.parts.jobs.dispatcher
    with service.client("alice") as alice:
        before, studies = total_jobs(alice), alice.get("/v1/studies").json()["total"]
        plan = alice.post("/v1/studies/plan", json=STUDY)
        assert plan.status_code == 200, plan.text
        plan = plan.json()
        assert (plan["jobs"], plan["merged"], plan["refused"], len(plan["cells"])) == (4, 2, 0, 4)
        assert [cell["runs_as"] for cell in plan["cells"]] == ["c000", "c000", "c002", "c002"]
        assert plan["estimated_jobs"] == 0 and plan["cpu_hours"] is None and plan["wall_s"] is None
        assert "no estimate: no earlier run of lenet5 none bottleneck on fashion-mnist × 1 worker" in plan["estimate"]
        # earlier runs of the base network: 30 s and 50 s for 2 epochs → 20 s per epoch (the median)
        base = JobSpec.model_validate({**BASE, "model": {"name": "lenet5", "attention": "none"}}).model_dump()
        assert (base["scaling"]["num_workers"], base["scaling"]["cpus_per_worker"]) == (1, 1)
        saved = dispatcher.history, dispatcher.history_read
        dispatcher.history, dispatcher.history_read = (
            History([finished_job(base, 30, startup_s=0), finished_job(base, 50, startup_s=0)]),
            math.inf,
        )
        try:
            costed = alice.post("/v1/studies/plan", json=STUDY).json()
        finally:
            dispatcher.history, dispatcher.history_read = saved
        after, studies_after = total_jobs(alice), alice.get("/v1/studies").json()["total"]
    assert costed["estimated_jobs"] == 2  # the base network's two seeds; SAN-c has no history
    assert costed["cpu_hours"] == pytest.approx(2 * 40 / 3600) and costed["wall_s"] == pytest.approx(80)
    basis = "2 earlier runs of lenet5 none bottleneck on fashion-mnist × 1 worker: 0.0 s to start, 20.0 s per epoch"
    assert basis in costed["estimate"]
    assert (after, studies_after) == (before, studies)  # nothing queued, nothing stored


def run_child(service, job_id: str, status: JobStatus) -> None:
    """The child's job through Ray, as the dispatcher would record it."""
    store = service.parts.store
    store.transition(job_id, JobStatus.SUBMITTED)
    store.transition(job_id, JobStatus.RUNNING)
    store.transition(job_id, status)


def wait_status(client, study_id: str, status: str) -> dict:
    deadline = time.monotonic() + 60
    while (study := client.get(f"/v1/studies/{study_id}", params={"table": "false"}).json())["status"] != status:
        assert time.monotonic() < deadline, study
        time.sleep(0.1)
    return study


def test_retry_runs_the_failed_cells_again_and_seeds_grow_the_table(service):
    """Issue 28, point 5: a study with one failed child; ``retry`` runs it again into the same study, which then
    succeeds; ``seeds`` adds a seed to the finished study, whose table grows to n = 3 in each cell."""
    with service.client("alice") as alice, service.client("bob") as bob:
        study = alice.post("/v1/studies", json=STUDY).json()
        children = service.parts.studies.studies.children(study["id"])
        for child in children:
            run_child(
                service,
                child.job.id,
                JobStatus.FAILED if (child.cell, child.seed) == ("c002", 1) else JobStatus.SUCCEEDED,
            )
        failed = wait_status(alice, study["id"], "failed")
        assert failed["cells"]["failed"] == 1 and failed["cells"]["done"] == 1
        for path in ("retry", "seeds"):
            assert bob.post(f"/v1/studies/{study['id']}/{path}", json={"seeds": [5]}).status_code == 404
        retried = alice.post(f"/v1/studies/{study['id']}/retry")
        assert retried.status_code == 200, retried.text
        retried = retried.json()
        assert retried["status"] == "running" and retried["jobs"] == {"queued": 1, "succeeded": 3}
        (again,) = set(retried["job_ids"]) - {child.job.id for child in children}
        assert alice.post(f"/v1/studies/{study['id']}/retry").status_code == 409  # nothing failed now
        assert service.parts.store.get(again).spec == next(
            c.job.spec for c in children if c.seed == 1 and c.cell == "c002"
        )
        # every (cell, seed) has a run under the parent, with its last epoch's top-1 (the retried one: the new run)
        uri = alice.get(f"/v1/jobs/{again}").json()["spec"]["tracking"]["mlflow_uri"]
        client = MlflowClient(uri)
        experiment = client.get_run(study["mlflow_run_id"]).info.experiment_id
        top1 = {
            ("c000", 0): 0.80,
            ("c000", 1): 0.82,
            ("c000", 2): 0.81,
            ("c002", 0): 0.84,
            ("c002", 1): 0.85,
            ("c002", 2): 0.86,
        }
        for (cell, seed), value in top1.items():
            tags = {"mlflow.parentRunId": study["mlflow_run_id"], "san.cell": cell, "san.seed": str(seed)}
            run = client.create_run(experiment, tags=tags).info.run_id
            client.log_metric(run, "val/top1", value, step=0)
            client.set_terminated(run)
        run_child(service, again, JobStatus.SUCCEEDED)
        done = wait_status(alice, study["id"], "succeeded")
        assert done["cells"]["done"] == 2 and client.get_run(study["mlflow_run_id"]).info.status == "FINISHED"
        assert alice.post(f"/v1/studies/{study['id']}/seeds", json={"seeds": [1]}).status_code == 422  # has it
        grown = alice.post(f"/v1/studies/{study['id']}/seeds", json={"seeds": [2]})
        assert grown.status_code == 200, grown.text
        grown = grown.json()
        assert grown["status"] == "running" and grown["spec"]["seeds"] == [0, 1, 2] and len(grown["job_ids"]) == 6
        assert client.get_run(study["mlflow_run_id"]).info.status == "RUNNING"  # reopened
        new = [c for c in service.parts.studies.studies.children(study["id"]) if c.seed == 2]
        assert sorted(c.cell for c in new) == ["c000", "c002"]
        assert {c.job.spec["training"]["seed"] for c in new} == {2}
        for child in new:
            run_child(service, child.job.id, JobStatus.SUCCEEDED)
        wait_status(alice, study["id"], "succeeded")
        table = alice.get(f"/v1/studies/{study['id']}/table").json()
    cells = {cell["key"]: cell for cell in table["cells"]}
    assert table["seeds"] == [0, 1, 2]
    for key in ("c000", "c002"):
        assert cells[key]["top1"]["values"] == [top1[(key, seed)] for seed in range(3)]
    assert cells["c002"]["diff_top1"]["n"] == 3


def test_after_a_restart_cancel_ends_the_children_and_the_study_and_kills_the_parent_run(service):
    with service.client("alice") as alice:
        study = alice.post("/v1/studies", json={**STUDY, "name": "to-cancel"}).json()
    service.restart()  # the study and its children are in the store: a new app finds and ends them
    with service.client("alice") as alice:
        assert alice.get(f"/v1/studies/{study['id']}").json()["jobs"] == {"queued": 4}
        cancelled = alice.post(f"/v1/studies/{study['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["jobs"] == {"cancelled": 4}
        deadline = time.monotonic() + 60
        while alice.get(f"/v1/studies/{study['id']}").json()["status"] == "running":
            assert time.monotonic() < deadline, "the finisher did not end the study"
            time.sleep(0.5)
        ended = alice.get(f"/v1/studies/{study['id']}").json()
        assert ended["status"] == "cancelled" and ended["cancel_requested"]
        assert alice.post(f"/v1/studies/{study['id']}/cancel").status_code == 409
        uri = alice.get(f"/v1/jobs/{study['job_ids'][0]}").json()["spec"]["tracking"]["mlflow_uri"]
    client = MlflowClient(uri)
    assert client.get_run(study["mlflow_run_id"]).info.status == "KILLED"
    logged = {a.path for a in client.list_artifacts(study["mlflow_run_id"], "results")}
    assert {"results/table.md", "results/table.csv", "results/table.json"} <= logged
    assert (service.root / "runs" / "studies" / study["id"] / "table.md").is_file()


def test_an_idempotency_key_returns_the_same_study_and_refuses_another_spec(service):
    with service.client("alice") as alice:
        key = {"Idempotency-Key": "study-key-1"}
        first = alice.post("/v1/studies", json=STUDY, headers=key)
        again = alice.post("/v1/studies", json=STUDY, headers=key)
        assert (first.status_code, again.status_code) == (201, 200) and first.json()["id"] == again.json()["id"]
        other = alice.post("/v1/studies", json={**STUDY, "seeds": [5]}, headers=key)
        assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]


@pytest.mark.parametrize(("change", "loc", "text"), [
    ({"axes": {"model.colour": ["red"]}}, ["body", "axes"], "model has no field 'colour'"),
    ({"axes": {"model.attention": []}}, ["body", "axes"], "has no values"),
    ({"axes": {"model.attention": ["none", "magic"]}}, ["body", "axes", "model.attention"], "unknown attention"),
    ({"axes": {"training.epochs": [2, 500]}}, ["body", "axes", "training.epochs"], "limit of 100"),
    ({"axes": {"data.dataset": ["fashion-mnist", "cifar10"]}}, ["body", "axes", "data.dataset"], "does not exist"),
    ({"axes": {"model.attention": ["none", "cbam", "bam", "san-c", "san-d"], "training.batch_size": [8, 16, 32]}},
     ["body", "axes"], "15 cells (5 × 3) is more than this service's limit of 12"),
    ({"base": {**BASE, "training": {"epochs": 101}}}, ["body", "base", "training", "epochs"], "limit of 100"),
])  # fmt: skip
def test_bad_studies_get_422_naming_the_axis_and_queue_nothing(service, change, loc, text):
    with service.client("alice") as alice:
        before, studies = total_jobs(alice), alice.get("/v1/studies").json()["total"]
        for path in ("/v1/studies", "/v1/studies/plan"):  # a plan is checked as a submission is
            response = alice.post(path, json={**STUDY, **change})
            assert response.status_code == 422, response.text
            error = response.json()["detail"][0]
            assert error["loc"][: len(loc)] == loc and text in error["msg"], error
        assert total_jobs(alice) == before and alice.get("/v1/studies").json()["total"] == studies


AXIS_VALUES = {
    "model.attention": st.sampled_from(["none", "cbam", "bam", "san-c", "san-d", "sand", "", {"a": 1}, [1], 3]),
    "model.placement": st.sampled_from(["bottleneck", "full", "reference", "middle"]),
    "model.attention_kwargs": st.dictionaries(
        st.sampled_from(["use_abs", "use_cca", "reduction", "dilation", "x"]),
        st.one_of(st.booleans(), st.integers(-3, 40)),
        max_size=2,
    ),
    "training.batch_size": st.integers(-2, 70_000),
    "lr.lr": st.floats(allow_nan=False, allow_infinity=False, min_value=-1, max_value=10),
    "model.name": st.sampled_from(["lenet5", "vgg16", "resnet18", "lenet9"]),
    "modle.name": st.just("lenet5"),
}
optional_fields = {
    "baseline": st.dictionaries(st.sampled_from(["model.attention", "x.y"]), st.sampled_from(["none", 1])),
    "name": st.text(max_size=12),
    "labels": st.dictionaries(st.sampled_from(["model.attention"]), st.lists(st.text(max_size=5), max_size=3)),
}
many_axes = st.integers(9, 40).map(lambda n: {f"model.attention_kwargs.k{i}": [1, 2] for i in range(n)})
long_axis = st.lists(st.integers(1, 64), min_size=60, max_size=70, unique=True).map(
    lambda sizes: {"training.batch_size": sizes}
)
study_specs = st.fixed_dictionaries({
    "base": st.just(BASE),
    "axes": st.one_of(
        st.dictionaries(st.sampled_from(sorted(AXIS_VALUES)), st.just(None), max_size=3).flatmap(
            lambda axes: st.fixed_dictionaries({path: st.lists(AXIS_VALUES[path], max_size=3) for path in axes})),
        many_axes, long_axis),
    "seeds": st.one_of(st.lists(st.integers(-5, 5), max_size=3), st.lists(st.integers(0, 300), max_size=120),
                       st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
}, optional=optional_fields)  # fmt: skip
RSS_MIB: list[float] = []  # the API's, at each example


def warm(client) -> None:
    """One study admitted and cancelled first, and a plan over every image model: the admission worker's start,
    MLflow's first run and each model's first build (its code's first run; CI once took 1.01 s for the first VGG-16)
    are paid once, by the service's start, not by an example's answer."""
    if not RSS_MIB:
        created = client.post("/v1/studies", json=STUDY)
        assert created.status_code == 201, created.text
        assert client.post(f"/v1/studies/{created.json()['id']}/cancel").status_code == 200
        every_model = [name for name, takes in MODELS.items() if takes == "images"]
        planned = client.post("/v1/studies/plan", json={**STUDY, "axes": {"model.name": every_model}})
        assert planned.status_code == 200 and planned.json()["refused"] == 0, planned.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=study_specs)
def test_any_study_spec_gets_a_json_answer_never_a_5xx_within_a_second_and_the_api_stays_its_size(service, body):
    """Whole study specs, including grids past every cap (on b867172 a 30-axis one took the API down)."""
    with service.client("bob") as bob:
        warm(bob)
        started = time.monotonic()
        response = bob.post("/v1/studies", json=body)
        took = time.monotonic() - started
        event(f"HTTP {response.status_code}")
        assert response.status_code in (201, 422), response.text  # a study share past the fuzz's, so no 429
        assert took < 1.0, f"{response.status_code} after {took:.2f} s"
        detail = response.json()
        if response.status_code == 201:
            assert len(detail["job_ids"]) <= 12 * len(body["seeds"])
            assert bob.post(f"/v1/studies/{detail['id']}/cancel").status_code == 200
        else:
            assert detail["detail"][0]["msg"]
    RSS_MIB.append(rss_mib(os.getpid()))  # the API runs in this process
    assert RSS_MIB[-1] - RSS_MIB[0] < 100, f"the API grew from {RSS_MIB[0]:.0f} to {RSS_MIB[-1]:.0f} MiB"
