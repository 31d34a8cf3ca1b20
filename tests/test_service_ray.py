"""The service end to end: uvicorn (``san serve``) → a real Ray head with dashboard (Ray Jobs) → Ray Train on
real Fashion-MNIST slices → a real ``mlflow server``. Queue limit 1, so jobs wait their turn."""

import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from san.masks import capture_masks
from service.local_ray import LocalRayHead
from service.ray_jobs import RayJobs, RayRefused, RayUnavailable, auth_token
from tests.services import Service, free_port, mlflow_server, read_events, stop_group, wait_for_job
from tests.slices import SLICE_PATHS, build_fmnist_slices
from training.config import JobSpec
from training.loop import CHECKPOINT_FILE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900, method="thread")]


def spec(epochs: int, **training) -> dict:
    return {
        "model": {"name": "lenet5", "attention": "san-c"},
        "data": SLICE_PATHS,
        "training": {"epochs": epochs, "batch_size": 32, **training},
        "validation": {"batch_size": 128},
        "lr": {"lr": 0.2, "peak_epoch": 1},
        "scaling": {"num_workers": 2},
        "tracking": {"system_metrics_interval_s": 1},
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    build_fmnist_slices(root / "data", train=512, val=256)
    head = LocalRayHead(free_port(), free_port(), num_cpus=2)
    head.start()
    mlflow, mlflow_url = mlflow_server(root)
    # the link users follow: only where the operator says where they see MLflow (here, the server itself)
    service = Service(
        root, ray_address=head.address, mlflow_uri=mlflow_url, max_submitted=1, mlflow_ui_url=mlflow_url
    ).start()
    yield service, head, mlflow_url
    service.stop()
    stop_group(mlflow)
    head.stop()


def ray_jobs(head: LocalRayHead) -> RayJobs:
    return RayJobs(head.address, auth_token(None), "python", {})


def test_a_job_survives_a_restart_of_the_api_runs_to_succeeded_and_its_metrics_are_the_mlflow_runs(stack):
    service, head, mlflow_url = stack
    with service.client() as alice:
        job_id = alice.post("/v1/jobs", json=spec(3)).json()["id"]
        wait_for_job(alice, job_id, {"running"})
    service.restart()  # while the job runs: the new API process finds it in the store and follows it to its end
    with service.client() as alice:
        assert job_id in {job["id"] for job in alice.get("/v1/jobs").json()["items"]}
        job = wait_for_job(alice, job_id, {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", job["error"]
        assert [t["status"] for t in job["transitions"]] == ["queued", "submitted", "running", "succeeded"]
        assert job["ray_submission_id"] == job_id and job["progress"]["epoch"] == job["progress"]["epochs"] == 3
        assert job["mlflow_url"].startswith(mlflow_url) and job["mlflow_url"].endswith(job["mlflow_run_id"])
        served = alice.get(f"/v1/jobs/{job_id}/metrics").json()
        logs = alice.get(f"/v1/jobs/{job_id}/logs", params={"tail": 50}).text
    client = MlflowClient(mlflow_url)
    run = client.get_run(served["mlflow_run_id"])
    assert run.data.tags["san.job_id"] == job_id and run.info.status == "FINISHED"
    for key in ("train/loss", "val/top1", "val/top5", "throughput/img_s"):
        from_mlflow = [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                         key=lambda m: m.step)]  # fmt: skip
        assert [(row["epoch"], row[key]) for row in served["epochs"]] == from_mlflow
    # …and both are what the training loop itself checkpointed.
    checkpoints = sorted((service.root / "runs" / "ray" / job_id).glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    history = torch.load(checkpoints[-1], weights_only=False)["history"]
    assert [row["epoch"] for row in served["epochs"]] == [0, 1, 2]
    assert [round(row["val/top1"], 6) for row in served["epochs"]] == [round(m["val/top1"], 6) for m in history]
    assert f"{job_id}: 3 epochs" in logs
    # the job's own log (training.driver_log) on its event stream: the workers' lines as Ray forwards them to the
    # driver, then the driver's last, each once, in the file's order
    events = read_events(service, f"/v1/jobs/{job_id}/events")
    lines = [data["line"] for kind, _, data in events if kind == "log"]
    assert lines == (service.root / "runs" / "jobs" / job_id / "log.txt").read_text().splitlines()
    assert any("(RayTrainWorker pid=" in line and "epoch 3/3" in line for line in lines)
    assert lines[-1].startswith(f"{job_id}: 3 epochs") and events[-1][0] == "end"
    # the tail Ray reads from the file's end: the whole log's last lines, no more
    whole = ray_jobs(head).http.get(f"/api/jobs/{job_id}/logs").json()["logs"].splitlines()
    assert len(whole) > 20 and logs.splitlines() == whole[-50:]
    with service.client() as alice:
        assert alice.get(f"/v1/jobs/{job_id}/logs", params={"tail": 7}).text.splitlines() == whole[-7:]
    assert ray_jobs(head).info(job_id).state == "succeeded"


def test_workers_beyond_the_cluster_are_refused_with_the_numbers(stack):
    service, _, _ = stack
    with service.client() as alice:
        response = alice.post("/v1/jobs", json={**spec(1), "scaling": {"num_workers": 3}})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"].endswith("needs 3 workers × 1 CPU = 3 CPUs, the cluster has 2 CPUs")
    with service.client(None) as anonymous:
        ready = anonymous.get("/readyz").json()
    assert ready["ready"] and {c["status"] for c in ready["checks"].values()} == {"ok"}


def test_cancelling_a_queued_job_never_reaches_ray_and_a_running_one_is_stopped(stack):
    service, head, _ = stack
    ray = ray_jobs(head)
    with service.client() as alice:
        long_id = alice.post("/v1/jobs", json=spec(40)).json()["id"]
        queued_id = alice.post("/v1/jobs", json=spec(1)).json()["id"]
        wait_for_job(alice, long_id, {"running"})
        assert alice.get(f"/v1/jobs/{queued_id}").json()["status"] == "queued"  # the limit is 1
        assert alice.post(f"/v1/jobs/{queued_id}/cancel").json()["status"] == "cancelled"
        assert ray.info(queued_id) is None
        cancelled = alice.post(f"/v1/jobs/{long_id}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["cancel_requested"]
        deadline = time.monotonic() + 60
        while ray.info(long_id).state != "cancelled" and time.monotonic() < deadline:
            time.sleep(1)
        assert ray.info(long_id).state == "cancelled"  # Ray's STOPPED
        time.sleep(2)  # a few queue ticks: the cancelled queued job must still not be submitted
        assert ray.info(queued_id) is None
        assert alice.get(f"/v1/jobs/{queued_id}").json()["status"] == "cancelled"


def test_ray_jobs_answers_are_told_apart_by_status_code(stack, tmp_path):
    _, head, _ = stack
    ray = ray_jobs(head)
    assert ray.info("job-never-submitted") is None and ray.logs("job-never-submitted", 10) == ""
    ray.stop("job-never-submitted")  # 404: nothing to stop, no error
    with pytest.raises(RayRefused, match="HTTP 403"):  # a wrong token: refused, not "unavailable"
        RayJobs(head.address, "not-the-token", "python", {}).info("job-never-submitted")
    with pytest.raises(RayUnavailable):
        RayJobs(f"http://127.0.0.1:{free_port()}", None, "python", {}).info("job-never-submitted")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(JobSpec.model_validate(spec(1)).model_dump_json())
    ray = RayJobs(head.address, auth_token(None), "/bin/true", {})  # an entrypoint that ends at once
    ray.submit("job-twice", spec_file, tmp_path / "report.json")
    ray.submit("job-twice", spec_file, tmp_path / "report.json")  # Ray's error for an id it holds: submitted
    assert ray.info("job-twice").state in ("submitted", "running", "succeeded")


def test_local_mode_starts_a_head_with_dashboard_and_stops_exactly_it(tmp_path):
    service = Service(tmp_path, ray_address="local", local_ray_port=free_port(), max_submitted=0,
                      local_ray_dashboard_port=free_port(), local_ray_cpus=1).start()  # fmt: skip
    try:
        with service.client() as alice:  # at once: a head that lists no CPUs yet must not make this a 422
            response = alice.post("/v1/jobs", json={**spec(1), "data": {}, "scaling": {"num_workers": 1}})
            assert response.status_code == 201, response.text
        with service.client("alice") as alice:  # a known token: /readyz with its details
            ready = alice.get("/readyz").json()
        assert ready["checks"]["ray"] == {"status": "ok", "detail": "2.60.0"}
        heads = [p for p in psutil.Process(service.process.pid).children(recursive=True) if "gcs_server" in p.name()]
        assert len(heads) == 1
    finally:
        service.stop()
    assert not heads[0].is_running()
    assert not Path(service.log).read_text().count("Traceback")


def study_body(epochs: int, attention: list[str], seeds: list[int]) -> dict:
    return {"name": "tiny", "base": {**spec(epochs), "scaling": {"num_workers": 1}}, "seeds": seeds,
            "axes": {"model.attention": attention, "model.placement": ["bottleneck", "full"]}}  # fmt: skip


def wait_for_study(client, study_id: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        study = client.get(f"/v1/studies/{study_id}").json()
        if study["status"] != "running":
            return study
        time.sleep(2)
    raise TimeoutError(f"{study_id} still running after {timeout_s:.0f} s: {study['jobs']}")


def last_value(client: MlflowClient, run_id: str, key: str) -> float:
    return max(client.get_metric_history(run_id, key), key=lambda m: m.step).value


def test_a_study_runs_its_children_nested_under_a_parent_run_and_its_table_is_their_metrics(stack, tmp_path):
    service, _, mlflow_url = stack
    with service.client() as alice:
        study = alice.post("/v1/studies", json=study_body(1, ["none", "san-c"], [0, 1])).json()
        ended = wait_for_study(alice, study["id"])
        table = alice.get(f"/v1/studies/{study['id']}/table").json()
        markdown = alice.get(f"/v1/studies/{study['id']}/table", params={"format": "md"}).text
    assert ended["status"] == "succeeded" and ended["jobs"] == {"succeeded": 4}
    assert ended["cells"]["done"] == 2
    client = MlflowClient(mlflow_url)
    parent = client.get_run(study["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")  # fmt: skip
    runs = {(r.data.tags["san.cell"], int(r.data.tags["san.seed"])): r for r in children}
    assert sorted(runs) == [("c000", 0), ("c000", 1), ("c002", 0), ("c002", 1)]  # lenet5: one run per network
    top1 = {key: last_value(client, run.info.run_id, "val/top1") for key, run in runs.items()}
    cells = {cell["key"]: cell for cell in table["cells"]}
    for key in ("c000", "c002"):
        values = [top1[(key, 0)], top1[(key, 1)]]
        assert cells[key]["top1"]["values"] == values
        assert cells[key]["top1"]["mean"] == pytest.approx(sum(values) / 2)
        assert cells[key]["top1"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    diffs = [top1[("c002", s)] - top1[("c000", s)] for s in (0, 1)]
    assert cells["c003"]["diff_top1"]["mean"] == pytest.approx(sum(diffs) / 2)  # full = bottleneck's runs
    assert cells["c003"]["diff_top1"]["positive"] == sum(d > 0 for d in diffs)
    assert int(runs[("c002", 0)].data.params["model.num_params"]) == cells["c002"]["params"]
    assert f"| SAN-c | {100 * cells['c002']['top1']['mean']:.2f} ± " in markdown
    # The results on the parent run: tables and figures, valid PNGs.
    results = Path(client.download_artifacts(parent.info.run_id, "results", str(tmp_path)))
    for name in ("val_top1", "epoch_seconds", "fig4_scale_space"):
        with Image.open(results / "figures" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 300
    # Fig. 4's data are capture_masks on the run's final checkpoint and the same input.
    san = runs[("c002", 0)].info.run_id
    maps = dict(np.load(client.download_artifacts(san, "attention/maps.npz", str(tmp_path / "maps"))))
    state = torch.load(client.download_artifacts(san, "checkpoints/last/checkpoint.pt", str(tmp_path / "ckpt")),
                       weights_only=False)  # fmt: skip
    model = JobSpec.model_validate(state["spec"]).build_model(10, 1)
    model.load_state_dict(state["model"])
    captured = capture_masks(model, torch.from_numpy(maps["image"]), inputs=True)[str(maps["path"])]
    assert list(captured) == ["current", "previous", "doc", "extrema", "smoothed", "mask"]
    for stage, tensor in captured.items():
        np.testing.assert_allclose(maps[stage].astype(np.float32), tensor[:, :16].numpy(), rtol=1e-2, atol=2e-3)


def test_cancelling_a_study_stops_the_running_child_and_never_starts_the_others(stack):
    service, head, mlflow_url = stack
    ray = ray_jobs(head)
    with service.client() as alice:
        study = alice.post("/v1/studies", json=study_body(40, ["none", "cbam", "bam"], [0])).json()
        first, *others = study["job_ids"]
        wait_for_job(alice, first, {"running"})
        cancelled = alice.post(f"/v1/studies/{study['id']}/cancel").json()
        assert cancelled["jobs"] == {"cancelled": 3} and cancelled["cancel_requested"]
        ended = wait_for_study(alice, study["id"], timeout_s=120)
    assert ended["status"] == "cancelled" and ended["cells"]["cancelled"] == 3
    deadline = time.monotonic() + 60
    while ray.info(first).state != "cancelled" and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.info(first).state == "cancelled" and all(ray.info(job) is None for job in others)
    assert MlflowClient(mlflow_url).get_run(study["mlflow_run_id"]).info.status == "KILLED"


def test_a_forecast_study_through_the_api_logs_cosine_and_mae_per_epoch_and_tables_them(stack, tmp_path):
    """Table VII's path on the embedded Airline series (built on first use under the data root): LSTM-4 with and
    without SAN, the table's cosine similarity and MAE are the runs' last epochs in MLflow."""
    service, _, mlflow_url = stack
    body = {"name": "tiny-forecast", "seeds": [0],
            "base": {"model": {"name": "lstm4"}, "data": {"dataset": "airline"},
                     "training": {"epochs": 3, "batch_size": 16}, "validation": {"batch_size": 64},
                     "lr": {"lr": 0.5, "schedule": "cosine"}, "optimizer": {"name": "adamw", "weight_decay": 0.0},
                     "scaling": {"num_workers": 1}, "tracking": {"system_metrics_interval_s": 1}},
            "axes": {"model.attention": ["none", "san-c"], "model.placement": ["full"]}}  # fmt: skip
    with service.client() as alice:
        response = alice.post("/v1/studies", json=body)
        assert response.status_code == 201, response.text
        study = response.json()
        ended = wait_for_study(alice, study["id"])
        table = alice.get(f"/v1/studies/{study['id']}/table").json()
        markdown = alice.get(f"/v1/studies/{study['id']}/table", params={"format": "md"}).text
    assert ended["status"] == "succeeded" and ended["jobs"] == {"succeeded": 2}, ended
    client = MlflowClient(mlflow_url)
    parent = client.get_run(study["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")  # fmt: skip
    runs = {r.data.tags["san.cell"]: r for r in children}
    assert sorted(runs) == ["c000", "c001"]
    cells = {cell["key"]: cell for cell in table["cells"]}
    assert table["metrics"] == ["cosine", "mae"]
    for key, run in runs.items():
        for metric in ("val/cosine", "val/mae", "val/loss", "train/loss"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == [0, 1, 2], (key, metric)  # one value per epoch
        assert -1 <= run.data.metrics["val/cosine"] <= 1 and run.data.metrics["val/mae"] > 0
        assert cells[key]["cosine"]["values"] == [last_value(client, run.info.run_id, "val/cosine")]
        assert cells[key]["mae"]["values"] == [last_value(client, run.info.run_id, "val/mae")]
        assert "val/top1" not in run.data.metrics
    mae = {key: cells[key]["mae"]["mean"] for key in ("c000", "c001")}
    assert cells["c001"]["diff_mae"]["mean"] == pytest.approx(mae["c001"] - mae["c000"])
    assert f"| SAN-c | {cells['c001']['cosine']['mean']:.4f} | {cells['c001']['mae']['mean']:.4f} |" in markdown
    # SAN's maps over time (N×C×T) on the run, and the study's figures drawn from them
    maps = dict(np.load(client.download_artifacts(runs["c001"].info.run_id, "attention/maps.npz", str(tmp_path))))
    assert maps["mask"].shape == (4, 16, 24) and maps["image"].shape == (4, 24, 1)
    assert maps["mask"].min() >= 0 and maps["mask"].max() <= 1 and maps["mask"].std() > 0  # float16: may round to 0
    results = Path(client.download_artifacts(parent.info.run_id, "results", str(tmp_path / "results")))
    for name in ("val_cosine", "epoch_seconds", "fig4_scale_space"):
        with Image.open(results / "figures" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 300
