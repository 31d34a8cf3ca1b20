"""Every MLflow call of a training job. The driver creates the experiment and the run; rank 0 logs into it."""

import subprocess
from pathlib import Path

import mlflow
import mlflow.pytorch
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from training.config import JobSpec
from training.paths import default_tracking_uri

METRIC_KEYS = (
    "train/loss", "val/loss", "val/top1", "val/top5", "time/epoch_s", "throughput/img_s", "lr", "resolution",
)  # fmt: skip


def tracking_uri(spec: JobSpec, storage_root: Path) -> str:
    return spec.tracking.mlflow_uri or default_tracking_uri(storage_root)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def create_run(spec: JobSpec, storage_root: Path, job_id: str, ray_run_name: str) -> tuple[str, str]:
    """In the driver: the experiment (with an explicit artifact location, so every process agrees on paths) and a
    run holding the flat spec as params and the job's tags. Returns (tracking URI, run id)."""
    uri = tracking_uri(spec, storage_root)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(spec.experiment)
    if experiment is None:
        artifacts = (Path(storage_root).resolve() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(spec.experiment, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    tags = {**spec.tracking.tags, "san.job_id": job_id, "git.commit": git_commit(), "ray.run_name": ray_run_name}
    run = client.create_run(experiment_id, run_name=spec.run_name, tags=tags)
    params = [Param(key, value[:6000]) for key, value in spec.flat().items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    client.log_text(run.info.run_id, spec.model_dump_json(indent=2), "spec.json")
    return uri, run.info.run_id


class RunLogger:
    """Rank 0's handle on the job's run. Epochs are logged at most once: after a restart from a checkpoint,
    epochs the run already holds are not logged again, and epochs it misses are filled from the history."""

    def __init__(self, uri: str, run_id: str, system_metrics_interval_s: float) -> None:
        self.client = MlflowClient(uri)
        self.uri, self.run_id = uri, run_id
        self.logged = {m.step for m in self.client.get_metric_history(run_id, "val/top1")}
        # The run stays active in this process so MLflow's sampler records system/* metrics while training.
        mlflow.set_tracking_uri(uri)
        mlflow.set_system_metrics_sampling_interval(system_metrics_interval_s)
        mlflow.start_run(run_id=run_id, log_system_metrics=True)

    def log_epochs(self, history: list[dict[str, float]]) -> None:
        for epoch, metrics in enumerate(history):
            if epoch in self.logged:
                continue
            timestamp = int(metrics.get("timestamp_ms", 0))
            batch = [Metric(key, float(metrics[key]), timestamp, epoch) for key in METRIC_KEYS if key in metrics]
            self.client.log_batch(self.run_id, metrics=batch)
            self.logged.add(epoch)

    def log_checkpoint(self, path: Path, name: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=f"checkpoints/{name}")

    def finish(self, model) -> None:
        """Log the final model and end the run as FINISHED."""
        # Explicit requirements: MLflow's inference re-imports the model in a subprocess, slowly. Pickle, not
        # MLflow 3's default torch.export format: loading needs the `san` package, but no example input.
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"
        mlflow.pytorch.log_model(model, name="model", pip_requirements=[torch_pin], serialization_format="pickle")
        mlflow.end_run("FINISHED")
