"""Ray Train jobs end to end: a real local Ray, real MLflow (SQLite), real FFCV slices of Fashion-MNIST."""

import signal
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from tests.faults import SignalWorker, checkpoints
from tests.slices import SLICE_PATHS, build_fmnist_slices
from training.config import JobSpec
from training.data.build import build_dataset
from training.data.loaders import make_loader
from training.data.manifest import load_manifest
from training.data.writer import WriterOptions
from training.driver_report import DriverReport, read_report
from training.launch import connect_ray, launch
from training.loop import CHECKPOINT_FILE, evaluate
from training.stop import MAX_CHECK_EVERY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600, method="thread")]

LONG_TRAIN = Path("fmnist-train-4k/train.beton")  # under the data root


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A 512 / 256-image slice of the real Fashion-MNIST (and a 4,096-image training slice, for epochs long enough
    to signal a worker mid-epoch), and the local Ray `san train` starts."""
    root = tmp_path_factory.mktemp("training")
    build_fmnist_slices(root / "data", train=512, val=256)
    build_dataset("fashion-mnist", None, root / "data" / LONG_TRAIN.parent, WriterOptions(num_workers=2, subset=4096))
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


def run(roots: Path, spec: JobSpec, name: str, **kwargs):
    return launch(spec, job_id=name, root=roots / "runs", data=roots / "data", **kwargs)


def history(result, key: str) -> list[tuple[int, float]]:
    return sorted(
        (m.step, m.value) for m in MlflowClient(result.mlflow_uri).get_metric_history(result.mlflow_run_id, key)
    )


def checkpoint_state(result) -> dict:
    return torch.load(Path(result.checkpoint_path) / CHECKPOINT_FILE, weights_only=False)


def test_two_worker_job_logs_every_epoch_to_mlflow_as_ray_reported(roots):
    resizing = {"min_res": 24, "max_res": 32, "start_ramp": 0, "end_ramp": 1, "step": 8, "val_res": 28}
    spec = job(roots, resolution=resizing)
    result = run(roots, spec, "two-workers")
    state = checkpoint_state(result)
    # the workers read the spec the driver wrote once into the run's directory, and trained exactly it
    assert JobSpec.model_validate_json((roots / "runs" / "ray" / "two-workers" / "spec.json").read_text()) == spec
    assert state["spec"] == spec.model_dump(mode="json")
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
    controllers = list_actors(
        address=ray.get_runtime_context().gcs_address,  # this cluster's: another test's may run beside it
        filters=[("class_name", "=", "TrainController")],
        raise_on_missing_output=False,
    )
    assert [actor.class_name for actor in controllers] == ["TrainController"]


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


ITERATIONS = 4096 // (8 * 2)  # steps per epoch of the signal tests: 4,096 images, batch 8 on each of 2 workers


def signal_job(roots: Path, epochs: int = 2) -> JobSpec:
    """Many small steps, so an epoch lasts long enough (≈ 1.5 s on 2 cores) for a signal to land mid-epoch."""
    return job(roots, data={"train_path": str(LONG_TRAIN)}, training={"epochs": epochs, "batch_size": 8},
               checkpoint={"keep": 10, "max_failures": 1})  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(roots):
    """The signal tests' job, run without a signal: what an interrupted run must repeat."""
    return checkpoint_state(run(roots, signal_job(roots), "uninterrupted"))["history"]


def same_epochs(history: list[dict], reference: list[dict]) -> None:
    keys = ("train/loss", "val/loss", "val/top1", "val/top5")
    expected = [[pytest.approx(m[key], rel=1e-6) for key in keys] for m in reference]
    assert [[m[key] for key in keys] for m in history] == expected


def kept_states(roots: Path, name: str) -> list[dict]:
    """The checkpoints Ray keeps in the job's storage, oldest first."""
    paths = checkpoints(roots / "runs" / "ray" / name)
    return [torch.load(path / CHECKPOINT_FILE, weights_only=False) for path in paths]


def train_worker_count() -> int:
    """Every RayTrainWorker the cluster has seen, dead or alive."""
    address = ray.get_runtime_context().gcs_address  # this cluster's: another test's may run beside it
    return len(list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=10_000))


def test_sigkill_to_a_worker_mid_epoch_restarts_the_group_and_logs_each_epoch_once(roots, uninterrupted, tmp_path):
    name, before, report = "sigkill", train_worker_count(), tmp_path / "report.json"
    killer = SignalWorker(roots / "runs" / "ray" / name, signal.SIGKILL, after_checkpoints=1, delay_s=0.5)
    killer.start()
    result = run(roots, signal_job(roots), name, report=report)
    killer.join(5)
    assert killer.error is None and killer.sent is not None
    assert not psutil.pid_exists(killer.sent[0])
    assert train_worker_count() - before == 4  # the first group of 2, then the group Ray restarted
    assert read_report(report) == DriverReport(mlflow_run_id=result.mlflow_run_id)  # said once the run existed
    assert [step for step, _ in history(result, "val/top1")] == [0, 1]
    state = checkpoint_state(result)
    assert [m["epoch"] for m in state["history"]] == [0, 1] and state["stops"] == []
    assert state["steps"] == 2 * ITERATIONS  # the lost epoch was trained again from its start, once
    same_epochs(state["history"], uninterrupted)  # with the same batches: the same model as without the kill
    assert MlflowClient(result.mlflow_uri).get_run(result.mlflow_run_id).info.status == "FINISHED"


def test_sigterm_to_a_worker_checkpoints_at_the_next_step_and_the_restart_resumes_at_that_step(roots, uninterrupted):
    name, before = "sigterm", train_worker_count()
    # At once: the stop lands within a check interval (up to 64 steps of this epoch's 256) of the signal, so a later
    # signal could land it at the epoch's end; any signal after epoch 0's checkpoint is at step 256 or later.
    notice = SignalWorker(roots / "runs" / "ray" / name, signal.SIGTERM, after_checkpoints=1, delay_s=0)
    notice.start()
    started = time.monotonic()
    result = run(roots, signal_job(roots), name)
    notice.join(5)
    assert notice.error is None and notice.sent is not None
    assert train_worker_count() - before == 4  # restarted once, from the preemption checkpoint
    state = checkpoint_state(result)
    [stop] = state["stops"]
    assert stop["reason"] == "preempted" and stop["epoch"] == 1, (stop, notice.sent)  # signalled after epoch 0
    # the next step boundary where the ranks agree, at most one check interval later (how long that interval is at a
    # given pace: test_training_stop.py, on a clock the test drives — the steps' pace here is the VM's, which the
    # epoch's time, counting validation and the checkpoint, does not tell)
    assert ITERATIONS <= stop["requested_at_step"] <= stop["at_step"] <= stop["requested_at_step"] + stop["check_every"]
    assert 1 <= stop["check_every"] <= MAX_CHECK_EVERY, stop
    assert 0 < stop["step"] < ITERATIONS, stop  # mid-epoch
    saved = [
        torch.load(path / CHECKPOINT_FILE, weights_only=False) for path in checkpoints(roots / "runs" / "ray" / name)
    ]
    assert [(s["epoch"], (s["partial"] or {}).get("step")) for s in saved] == [(0, None), (1, stop["step"]), (1, None)]
    assert saved[1]["steps"] == stop["at_step"]  # the checkpoint holds every step done before the stop
    assert state["steps"] == 2 * ITERATIONS  # resumed at that step: none trained twice, none skipped
    same_epochs(state["history"], uninterrupted)  # and on the same batches: the model an uninterrupted run trains
    assert [step for step, _ in history(result, "val/top1")] == [0, 1]
    assert MlflowClient(result.mlflow_uri).get_run(result.mlflow_run_id).info.status == "FINISHED"
    print(f"sigterm run: {time.monotonic() - started:.1f} s, stop {stop}")


def test_the_best_checkpoint_is_the_best_epoch_even_off_schedule_and_past_the_kept_ones(roots, tmp_path):
    """Checkpoints every 3 epochs of 5 (epochs 2 and 4), Ray keeping 1; an LR rising to a peak at the end makes
    the late epochs worse, so the best is an early epoch that no scheduled checkpoint holds."""
    name = "best"
    spec = job(roots, data={"train_path": str(LONG_TRAIN)}, scaling={"num_workers": 1}, training={"epochs": 5},
               lr={"lr": 8.0, "peak_epoch": 5}, checkpoint={"every_epochs": 3, "keep": 1})  # fmt: skip
    result = run(roots, spec, name)
    top1 = [value for _, value in history(result, "val/top1")]
    val_loss = [value for _, value in history(result, "val/loss")]
    best_epoch = max(range(len(top1)), key=lambda e: (top1[e], -val_loss[e]))  # equal top-1: the lower loss
    assert best_epoch not in (2, 4), top1  # the premise: no scheduled checkpoint holds the best epoch
    kept = [
        torch.load(path / CHECKPOINT_FILE, weights_only=False)["epoch"]
        for path in checkpoints(roots / "runs" / "ray" / name)
    ]
    assert kept == [4]  # checkpoint.keep = 1: Ray keeps the last
    client = MlflowClient(result.mlflow_uri)
    last = torch.load(client.download_artifacts(result.mlflow_run_id, f"checkpoints/last/{CHECKPOINT_FILE}",
                                                str(tmp_path / "last")), weights_only=False)  # fmt: skip
    best = torch.load(client.download_artifacts(result.mlflow_run_id, f"checkpoints/best/{CHECKPOINT_FILE}",
                                                str(tmp_path / "best")), weights_only=False)  # fmt: skip
    assert last["epoch"] == 4
    assert best["epoch"] == best_epoch and best["history"][-1]["val/top1"] == max(top1)
    assert best["best_score"] == pytest.approx(max(top1) - 1e-9 * val_loss[best_epoch], abs=1e-12)
    # Its weights are that epoch's model: evaluated again here, the loss and accuracy that epoch logged.
    data = roots / "data"
    manifest = load_manifest(data / SLICE_PATHS["train_path"])
    model = spec.build_model(manifest.num_classes, manifest.channels)
    model.load_state_dict(best["model"])
    loader = make_loader(data / SLICE_PATHS["val_path"], train=False, batch_size=100, in_chans=manifest.channels,
                         mean=manifest.mean, std=manifest.std)  # fmt: skip
    again = evaluate(model, loader, spec, torch.device("cpu"))
    assert again["val/top1"] == pytest.approx(max(top1))
    assert again["val/loss"] == pytest.approx(val_loss[best_epoch], rel=1e-4)
    assert all(abs(loss - val_loss[best_epoch]) > 1e-3 for epoch, loss in enumerate(val_loss) if epoch != best_epoch)
