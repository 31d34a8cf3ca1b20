"""Ray Train jobs end to end: a real local Ray, real MLflow (SQLite), real FFCV slices of Fashion-MNIST."""

from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from tests.slices import SLICE_PATHS, build_fmnist_slices
from training.config import JobSpec
from training.launch import connect_ray, launch
from training.loop import CHECKPOINT_FILE, FAIL_ONCE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600, method="thread")]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A 512 / 256-image slice of the real Fashion-MNIST, and the local Ray `san train` starts."""
    root = tmp_path_factory.mktemp("training")
    build_fmnist_slices(root / "data", train=512, val=256)
    connect_ray(2)
    yield root
    ray.shutdown()


def job(roots: Path, **overrides) -> JobSpec:
    sections = {
        "model": {"name": "lenet5", "attention": "san-c"},
        "data": SLICE_PATHS,
        "training": {"epochs": 2, "batch_size": 32},
        "validation": {"batch_size": 100},
        "lr": {"lr": 0.2, "peak_epoch": 1},
        "scaling": {"num_workers": 2},
        "tracking": {"system_metrics_interval_s": 1},
    }
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    return JobSpec.model_validate(sections)


def run(roots: Path, spec: JobSpec, name: str):
    return launch(spec, job_id=name, root=roots / "runs", data=roots / "data")


def history(result, key: str) -> list[tuple[int, float]]:
    return sorted(
        (m.step, m.value) for m in MlflowClient(result.mlflow_uri).get_metric_history(result.mlflow_run_id, key)
    )


def checkpoint_state(result) -> dict:
    return torch.load(Path(result.checkpoint_path) / CHECKPOINT_FILE, weights_only=False)


def test_two_worker_job_logs_every_epoch_to_mlflow_as_ray_reported(roots):
    resizing = {"min_res": 24, "max_res": 32, "start_ramp": 0, "end_ramp": 1, "step": 8, "val_res": 28}
    result = run(roots, job(roots, resolution=resizing), "two-workers")
    state = checkpoint_state(result)
    assert [m["epoch"] for m in state["history"]] == [0, 1]
    assert [m["resolution"] for m in state["history"]] == [24, 32]  # progressive resizing, as delivered
    for key in ("train/loss", "val/top1", "val/top5", "val/loss", "throughput/img_s"):
        logged = history(result, key)
        assert logged == [(e, pytest.approx(m[key])) for e, m in enumerate(state["history"])]
        assert logged[-1][1] == pytest.approx(result.metrics[key])
    assert result.metrics["val/images"] == 256  # every validation image, counted across both workers
    assert 0.1 < result.metrics["val/top1"] <= result.metrics["val/top5"] <= 1
    run_data = MlflowClient(result.mlflow_uri).get_run(result.mlflow_run_id)
    assert run_data.info.run_name == "lenet5-san-c-bottleneck-s0" and run_data.info.status == "FINISHED"
    assert run_data.data.params["model.attention"] == "san-c" and run_data.data.params["scaling.num_workers"] == "2"
    assert run_data.data.tags["san.job_id"] == "two-workers" and len(run_data.data.tags["git.commit"]) == 40
    assert any(key.startswith("system/cpu") for key in run_data.data.metrics)
    artifacts = {a.path for a in MlflowClient(result.mlflow_uri).list_artifacts(result.mlflow_run_id)}
    assert {"spec.json", "checkpoints"} <= artifacts
    # The State API answers on the cluster `san train` starts: Ray Train's placement-group cleaner asks it every
    # second whether the controller lives (without it, a warning every second).
    controllers = list_actors(filters=[("class_name", "=", "TrainController")], raise_on_missing_output=False)
    assert [actor.class_name for actor in controllers] == ["TrainController"]


def test_a_worker_failure_resumes_from_the_last_checkpoint_without_gaps_or_repeats(roots, tmp_path, monkeypatch):
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"2:{marker}")
    result = run(roots, job(roots, training={"epochs": 3}, checkpoint={"max_failures": 1}), "fails-once")
    assert marker.exists()  # the failure did happen
    assert [step for step, _ in history(result, "val/top1")] == [0, 1, 2]
    assert [m["epoch"] for m in checkpoint_state(result)["history"]] == [0, 1, 2]
    assert MlflowClient(result.mlflow_uri).get_run(result.mlflow_run_id).info.status == "FINISHED"


def test_same_seed_on_one_worker_gives_identical_metrics_twice(roots):
    spec = job(roots, scaling={"num_workers": 1})
    first, second = (checkpoint_state(run(roots, spec, f"repeat-{i}"))["history"] for i in range(2))
    for key in ("train/loss", "val/loss", "val/top1", "val/top5"):
        assert [m[key] for m in first] == [m[key] for m in second]


def test_bad_specs_fail_before_ray_starts(roots):
    with pytest.raises(ValueError, match=r"training\.batch_size: 512 × 2 workers = 1024 is larger than"):
        run(roots, job(roots, training={"batch_size": 512}), "too-big")
    with pytest.raises(ValueError, match=r"data\.train_path: .* is outside the data root"):
        run(roots, job(roots, data={"train_path": "/etc/passwd"}), "outside")
    assert not (roots / "runs" / "ray" / "too-big").exists()
