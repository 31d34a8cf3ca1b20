"""``GET /v1/compare`` (issue 28, point 6): two sets of runs — jobs, or a study's cell — paired on their seeds, the
difference's 95 % interval equal to SciPy's paired t-test computed here from the logged values. Over the app in
process, a real store and a real MLflow tracking store (SQLite)."""

import pytest
import scipy.stats
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from service.comparison import MAX_JOBS
from training.states import JobStatus

pytestmark = pytest.mark.timeout(300, method="thread")


@pytest.fixture(scope="module")
def service(in_process, tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return in_process(max_submitted=0, ray_address="http://127.0.0.1:9", mlflow_uri=uri), uri


def finished(service, uri: str, job_id: str, top1: list[float], status=JobStatus.SUCCEEDED) -> None:
    """The job as the dispatcher would leave it: its run reported, ``top1`` logged one value per epoch."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("compare") or client.create_experiment("compare")
    experiment_id = experiment if isinstance(experiment, str) else experiment.experiment_id
    run = client.create_run(experiment_id).info.run_id
    client.log_batch(run, metrics=[Metric("val/top1", value, 0, epoch) for epoch, value in enumerate(top1)])
    store = service.parts.store
    store.transition(job_id, JobStatus.SUBMITTED)
    store.transition(job_id, JobStatus.RUNNING, mlflow_run_id=run)
    store.transition(job_id, status)


def post_job(client, seed: int, attention: str = "none") -> str:
    body = {"model": {"attention": attention}, "training": {"epochs": 2, "seed": seed}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_two_sets_of_jobs_are_paired_on_their_seeds_with_scipys_interval(service):
    service, uri = service
    # the last epoch counts, never the best: each run had a better epoch before its last
    ours, theirs = {0: 0.84, 1: 0.86, 2: 0.83}, {0: 0.80, 1: 0.82, 2: 0.81}
    with service.client() as alice:
        a = {seed: post_job(alice, seed, "cbam") for seed in ours}
        b = {seed: post_job(alice, seed) for seed in (2, 1, 0)}  # another order: pairing is by seed
        failed = post_job(alice, 3, "cbam")
    for seed, value in ours.items():
        finished(service, uri, a[seed], [0.5, value + 0.05, value])
    for seed, value in theirs.items():
        finished(service, uri, b[seed], [0.4, value + 0.05, value])
    finished(service, uri, failed, [0.99], JobStatus.FAILED)
    with service.client() as alice:
        response = alice.get("/v1/compare", params={"a": ",".join([*a.values(), failed]), "b": ",".join(b.values())})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["a"]["values"] == {str(s): pytest.approx(v) for s, v in ours.items()}
    assert answer["a"]["jobs"] == {str(s): job for s, job in a.items()}
    assert answer["a"]["skipped"] == {failed: "failed"}
    difference = answer["difference"]
    expected = scipy.stats.ttest_rel([ours[s] for s in range(3)], [theirs[s] for s in range(3)])
    interval = expected.confidence_interval(0.95)
    assert difference["ci95"] == pytest.approx([interval.low, interval.high])
    assert difference["mean"] == pytest.approx(sum(ours[s] - theirs[s] for s in range(3)) / 3)
    assert difference["seeds"] == [0, 1, 2] and difference["positive"] == difference["better"] == 3
    assert difference["resolved"] is bool(interval.low > 0)
    # one seed on a side: nothing to pair beyond it, no interval
    with service.client() as alice:
        single = alice.get("/v1/compare", params={"a": a[1], "b": b[1]}).json()["difference"]
    assert single["n"] == 1 and single["ci95"] is None and single["mean"] == pytest.approx(0.04)


def test_a_study_cell_is_a_set_of_runs_and_errors_name_the_side(service):
    service, uri = service
    body = {
        "name": "cells",
        "base": {"training": {"epochs": 2}},
        "seeds": [0, 1],
        "axes": {"model.attention": ["none", "san-c"]},
    }
    with service.client() as alice:
        study = alice.post("/v1/studies", json=body)
        assert study.status_code == 201, study.text
        study = study.json()
        other = post_job(alice, 0)
    values = {("c000", 0): 0.70, ("c000", 1): 0.72, ("c001", 0): 0.75, ("c001", 1): 0.71}
    for child in service.parts.studies.studies.children(study["id"]):
        finished(service, uri, child.job.id, [values[(child.cell, child.seed)]])
    finished(service, uri, other, [0.65])
    with service.client() as alice:
        answer = alice.get("/v1/compare", params={"a": f"{study['id']}/c001", "b": f"{study['id']}/c000"}).json()
        assert answer["difference"]["values"] == pytest.approx([0.05, -0.01])
        assert answer["difference"]["positive"] == 1 and answer["difference"]["n"] == 2
        mae = alice.get("/v1/compare", params={"a": f"{study['id']}/c001", "b": f"{study['id']}/c000", "metric": "mae"})
        assert mae.status_code == 200 and mae.json()["difference"] is None  # no run logged val/mae
        assert mae.json()["a"]["skipped"] and "val/mae" in next(iter(mae.json()["a"]["skipped"].values()))

        def status(**params) -> tuple[int, str]:
            response = alice.get("/v1/compare", params=params)
            return response.status_code, response.text

        assert status(a=f"{study['id']}/c009", b=other)[0] == 404
        assert status(a="study-0123456789abcdef/c000", b=other)[0] == 404
        assert status(a="job-nope", b=other) == (404, '{"detail":"no job \'job-nope\'"}')
        code, text = status(a=",".join(f"job-{number}" for number in range(MAX_JOBS + 1)), b=other)
        assert code == 422 and '"a"' in text and f"1 to {MAX_JOBS} job ids" in text
        twice = post_job(alice, 0)
        finished(service, uri, twice, [0.6])
        code, text = status(a=f"{other},{twice}", b=other)
        assert code == 422 and "both ran seed 0" in text
        assert status(a=other, b=other, metric="top9")[0] == 422
        assert status(b=other)[0] == 422
    with service.client("bob") as bob:  # another principal's jobs and studies do not exist for bob
        assert bob.get("/v1/compare", params={"a": other, "b": other}).status_code == 404
        assert bob.get("/v1/compare", params={"a": f"{study['id']}/c000", "b": other}).status_code == 404
