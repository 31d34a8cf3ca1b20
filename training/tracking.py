"""Every MLflow call of a training job. The driver creates the experiment and the run; rank 0 logs into it.

The calls that need no torch (runs created and ended, a study's runs, metric histories) are `training.mlflow_runs`'
and re-exported here; rank 0's logging of models and attention maps, which needs torch, is here.
"""

import tempfile
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from san.masks import capture_masks
from training.mlflow_runs import (
    ATTENTION_MAPS,
    EXPERIMENT_KIND,
    METRIC_KEYS,
    create_run,
    create_study_run,
    download_attention_maps,
    end_run,
    end_unfinished_runs,
    ensure_experiment,
    finish_study_run,
    git_commit,
    metric_history,
    study_child_runs,
    tracking_uri,
)
from training.states import JobStatus

__all__ = [
    "ATTENTION_MAPS",
    "EXPERIMENT_KIND",
    "MAP_CHANNELS",
    "METRIC_KEYS",
    "RunLogger",
    "attention_maps",
    "create_run",
    "create_study_run",
    "download_attention_maps",
    "end_run",
    "end_unfinished_runs",
    "ensure_experiment",
    "finish_study_run",
    "git_commit",
    "metric_history",
    "study_child_runs",
    "tracking_uri",
]

MAP_CHANNELS = 16  # channels kept per map: a picture shows a grid of these, and a ResNet stem's 64 at 112 px is large


def attention_maps(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray] | None:
    """What the paper's Fig. 4 and Fig. 8 draw, for the model's first attention module: its inputs (``previous``
    for SAN, ``current``) and its taps (``doc``, ``extrema``, ``smoothed``, ``mask``, …) from `capture_masks`, the
    first `MAP_CHANNELS` channels in float16; the ``image``s, ``label``s, the module's ``path``. None without
    attention."""
    captured = capture_masks(model, images, inputs=True)
    if not captured:
        return None
    path, maps = next(iter(captured.items()))
    out = {name: tensor[:, :MAP_CHANNELS].float().cpu().numpy().astype(np.float16) for name, tensor in maps.items()}
    out.update(image=images.float().cpu().numpy(), label=labels.cpu().numpy(), path=np.array(path))
    return out


class RunLogger:
    """Rank 0's handle on the job's run. Epochs are logged at most once: after a restart from a checkpoint,
    epochs the run already holds are not logged again, and epochs it misses are filled from the history."""

    def __init__(self, uri: str, run_id: str, system_metrics_interval_s: float) -> None:
        self.client = MlflowClient(uri)
        self.uri, self.run_id = uri, run_id
        self.logged = {m.step for m in self.client.get_metric_history(run_id, "val/loss")}  # every task logs it
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

    def log_model_size(self, model: torch.nn.Module) -> None:
        self.client.log_param(self.run_id, "model.num_params", str(sum(p.numel() for p in model.parameters())))

    def log_attention_maps(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The first attention module's maps (`attention_maps`) for ``images``, as ``attention/maps.npz``."""
        maps = attention_maps(model, images, labels)
        if maps is None:
            return
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / ATTENTION_MAPS.rsplit("/", 1)[1]
            np.savez_compressed(path, **maps)
            self.client.log_artifact(self.run_id, str(path), artifact_path=ATTENTION_MAPS.rsplit("/", 1)[0])

    def finish(self, model) -> None:
        """Log the final model and end the run as FINISHED."""
        # Explicit requirements: MLflow's inference re-imports the model in a subprocess, slowly. Pickle, not
        # MLflow 3's default torch.export format: loading needs the `san` package, but no example input.
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"
        mlflow.pytorch.log_model(model, name="model", pip_requirements=[torch_pin], serialization_format="pickle")
        mlflow.end_run(JobStatus.SUCCEEDED.mlflow_status())

    def end(self, status: str) -> None:
        """End the run with ``status`` without a final model (a cancel: ``KILLED``); system metrics stop too."""
        mlflow.end_run(status)
