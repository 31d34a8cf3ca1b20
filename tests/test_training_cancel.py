"""Cancelling a running training job the way the service does: Ray Jobs' stop on a Ray head with dashboard, which
sends SIGTERM to the job's driver (``python -m training.run``). Real Ray, real MLflow (SQLite), real FFCV slices."""

import json
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from service.local_ray import LocalRayHead, free_ports
from service.ray_jobs import RayJobs
from tests.faults import checkpoints
from tests.services import wait_until
from tests.slices import SLICE_PATHS, build_fmnist_slices
from training.config import JobSpec
from training.driver_report import DriverReport, read_report, report_path
from training.loop import CHECKPOINT_FILE
from training.paths import default_tracking_uri
from training.stop import stop_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600, method="thread")]

STOP_WAIT_S = 60  # RAY_JOB_STOP_WAIT_TIME_S: Ray's default, 3 s, is shorter than a checkpoint through the controller


def test_stop_job_checkpoints_at_a_step_boundary_and_ends_the_mlflow_run_killed(tmp_path):
    build_fmnist_slices(tmp_path / "data", train=4096, val=256)  # epochs of ≈ 1.5 s: stopped mid-run
    runs, job_id = tmp_path / "runs", "cancel-me"
    spec = {
        "model": {"name": "lenet5", "attention": "san-c"},
        "data": SLICE_PATHS,
        "training": {"epochs": 4, "batch_size": 8},
        "validation": {"batch_size": 100},
        "lr": {"lr": 0.2, "peak_epoch": 1},
        "scaling": {"num_workers": 2},
        "checkpoint": {"keep": 10},
        "tracking": {"system_metrics_interval_s": 1},
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    head = LocalRayHead(*free_ports(2), num_cpus=2)
    head.start()
    env = {"SAN_STORAGE_ROOT": str(runs), "SAN_DATA_ROOT": str(tmp_path / "data"),
           "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}  # fmt: skip
    jobs = RayJobs(head.address, head.token, sys.executable, env)
    try:
        jobs.submit(job_id, spec_path, report_path(spec_path))
        run_dir = runs / "ray" / job_id
        wait_until(lambda: run_dir.is_dir() and checkpoints(run_dir), 240, "epoch 0's checkpoint")
        time.sleep(0.5)  # into epoch 1
        stopped_at = time.monotonic()
        jobs.stop(job_id)
        wait_until(lambda: jobs.info(job_id).state == "cancelled", STOP_WAIT_S + 30, "Ray's STOPPED", 0.5)
        took = time.monotonic() - stopped_at
        logs = jobs.logs(job_id, 10_000)
    finally:
        jobs.close()
        head.stop()
    assert f"{job_id}: cancelled; checkpoint" in logs, logs[-3000:]  # the driver ended on its own, not SIGKILLed
    assert took < STOP_WAIT_S
    client = MlflowClient(default_tracking_uri(runs))
    [run] = client.search_runs([client.get_experiment_by_name(JobSpec.model_validate(spec).experiment).experiment_id],
                               f"tags.`san.job_id` = '{job_id}'")  # fmt: skip
    assert run.info.status == "KILLED"
    assert read_report(report_path(spec_path)) == DriverReport(mlflow_run_id=run.info.run_id)  # a cancel is no error
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
    assert logged == list(range(len(logged))) and 1 <= len(logged) < 4  # each finished epoch once, not all 4
    states = [torch.load(path / CHECKPOINT_FILE, weights_only=False) for path in checkpoints(run_dir)]
    last = states[-1]
    [stop] = last["stops"]
    assert stop["reason"] == "cancelled" and stop["at_step"] - stop["requested_at_step"] <= 1
    assert last["steps"] == stop["at_step"]  # every step done before the stop is in the checkpoint
    assert [s["epoch"] for s in states[:-1]] == list(range(len(states) - 1)) == logged
    if last["partial"]:  # mid-epoch (or, had it come at an epoch's last step, after that epoch)
        assert last["epoch"] == len(logged) and last["partial"]["step"] == stop["step"]
    mlflow_last = torch.load(client.download_artifacts(run.info.run_id, f"checkpoints/last/{CHECKPOINT_FILE}",
                                                       str(tmp_path / "last")), weights_only=False)  # fmt: skip
    assert mlflow_last["stops"] == last["stops"]
    assert not stop_file(runs, job_id).exists()
    print(f"stop_job → STOPPED in {took:.1f} s; stop {stop}")
