"""The job's driver (``python -m training.run``): what it tells the service (`training.driver_report`) and how the
spec reaches the workers — validated once in the driver, one file every worker reads and trusts."""

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

import training.config
from tests.faults import checkpoints
from tests.slices import build_fmnist_slices, slice_job
from training.config import JobSpec, trusted_spec
from training.driver_report import read_report, report_path
from training.launch import SPEC_FILE, spec_file
from training.loop import CHECKPOINT_FILE
from training.paths import default_tracking_uri


def spec() -> JobSpec:
    return JobSpec.model_validate(slice_job(epochs=1) | {"tracking": {"tags": {"team": "vision"}}})


def test_the_workers_read_the_given_json_on_shared_storage_and_else_one_file_written_in_the_run(tmp_path):
    root, job = tmp_path / "runs", spec()
    given = root / "jobs" / "job-1" / "spec.json"  # as the service stores it
    given.parent.mkdir(parents=True)
    given.write_text(job.model_dump_json())
    assert spec_file(job, root, "job-1", given) == given.resolve()
    assert not (root / "ray").exists()  # nothing written: the workers read the service's file
    elsewhere = tmp_path / "mine.json"  # perhaps on the submitting machine only
    elsewhere.write_text(job.model_dump_json())
    for job_id, source in (("job-2", elsewhere), ("job-3", None)):
        written = spec_file(job, root, job_id, source)
        assert written == (root / "ray" / job_id / SPEC_FILE).resolve()
        assert JobSpec.model_validate_json(written.read_text()) == job
    assert [p.name for p in (root / "ray" / "job-2").iterdir()] == [SPEC_FILE]  # by rename: no temp file left


def test_a_worker_trusts_the_spec_file_parsing_its_sections_without_building_the_model(tmp_path, monkeypatch):
    path, job = tmp_path / "spec.json", spec()
    path.write_text(job.model_dump_json())
    built = []
    monkeypatch.setattr(training.config, "count_model_params", lambda *key: built.append(key) or 1)
    trusted = trusted_spec(path)
    assert built == [] and trusted == job  # sections as models, every field as the driver validated it
    assert isinstance(trusted.model, training.config.ModelSection) and trusted.tracking.tags == {"team": "vision"}
    JobSpec.load(path)
    assert len(built) == 1  # validation proper does build it (on the meta device); the worker's context is reset


@pytest.mark.slow
@pytest.mark.timeout(600, method="thread")
def test_the_driver_reports_its_mlflow_run_id_and_the_workers_train_the_spec_file_it_was_given(tmp_path):
    data, runs, job_id = tmp_path / "data", tmp_path / "runs", "driven"
    build_fmnist_slices(data, train=128, val=64)
    given = runs / "jobs" / job_id / "spec.json"  # as the service stores it: on the storage root
    given.parent.mkdir(parents=True)
    given.write_text(json.dumps(slice_job(epochs=1)))
    env = {**os.environ, "SAN_DATA_ROOT": str(data), "SAN_STORAGE_ROOT": str(runs)}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable,
        "-m",
        "training.run",
        str(given),
        "--job-id",
        job_id,
        "--report-file",
        str(report_path(given)),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=500, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    client = MlflowClient(default_tracking_uri(runs))
    experiment = client.get_experiment_by_name(JobSpec.load(given).experiment)
    [run] = client.search_runs([experiment.experiment_id], f"tags.`san.job_id` = '{job_id}'")
    report = read_report(report_path(given))
    assert report is not None and report.mlflow_run_id == run.info.run_id and report.error is None
    run_dir = runs / "ray" / job_id
    assert not (run_dir / SPEC_FILE).exists()  # the workers read the given file: the driver wrote no copy
    [checkpoint] = checkpoints(run_dir)
    state = torch.load(checkpoint / CHECKPOINT_FILE, weights_only=False)
    assert state["spec"] == JobSpec.load(given).model_dump(mode="json")
