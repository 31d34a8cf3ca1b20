"""What a job learns, by its dataset's task: the loss it trains with, the metrics it validates with (summed over
batches and workers, then divided once), the score that picks its best epoch, and its progress line.

- ``classification`` (images; gesture series — the paper's Mocap role, Table VI): cross-entropy; top-1 and top-5
  accuracy; and ``val/mae``, Table VI's "Loss (MAE)": the mean absolute difference between the softmax and the
  one-hot label, over classes and samples (the paper does not define it further). Best epoch: highest top-1, and
  of equal top-1 (a small set at 100 %) the lowest loss.
- ``forecast`` (the paper's flight-fuel role, Table VII): trained on the mean absolute error of the normalised
  targets; ``val/mae`` is that error in the data's own units (× the targets' train-split std), and
  ``val/cosine`` — Table VII's "Accuracy (cos. sim.)" — the cosine similarity between each predicted horizon
  and the true one, in normalised units (raw positive series, such as passenger counts, would make every
  forecast look alike at 0.99+), averaged over windows. The loader gives targets relative to the window's last
  observed value (`training.data.series_loader`); the cosine adds that level back first, so it compares
  forecasts, not changes. Best epoch: lowest MAE.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# What a study's table shows of each task, declared without torch (the service reads it): re-exported here.
from training.metrics import LOGGED, METRICS, TASKS, Metric, table_metrics

__all__ = [
    "LOGGED",
    "METRICS",
    "TASKS",
    "Classification",
    "Forecast",
    "Metric",
    "Task",
    "table_metrics",
    "task_of",
    "validation_metrics",
]


@dataclass(frozen=True)
class Classification:
    label_smoothing: float = 0.0
    name = "classification"
    sums = ("loss", "top1", "top5", "mae")
    score_key = "val/top1"  # higher is better

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)

    def batch_sums(self, outputs: Tensor, targets: Tensor, level: Tensor | None = None) -> Tensor:
        outputs = outputs.float()
        top = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        one_hot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
        mae = (outputs.softmax(dim=1) - one_hot).abs().mean(dim=1).sum()
        loss = F.cross_entropy(outputs, targets, reduction="sum")
        return torch.stack([loss, hits[:, 0].sum(), hits.any(dim=1).sum(), mae]).double()

    def score(self, metrics: dict[str, float]) -> float:
        return metrics["val/top1"] - 1e-9 * metrics["val/loss"]  # below one sample's worth of top-1 on any set

    def progress(self, metrics: dict[str, Any]) -> str:
        return f"val/top1 {metrics['val/top1']:.4f}  val/top5 {metrics['val/top5']:.4f}"


@dataclass(frozen=True)
class Forecast:
    # Each target column's train-split std: normalised errors × these are in the data's units. Outputs hold the
    # horizon step by step, each step every target column (`training.data.series_loader`).
    target_std: tuple[float, ...] = (1.0,)
    name = "forecast"
    sums = ("loss", "mae", "cosine")
    score_key = "val/mae"  # lower is better

    def criterion(self) -> nn.Module:
        return nn.L1Loss()

    def batch_sums(self, outputs: Tensor, targets: Tensor, level: Tensor | None = None) -> Tensor:
        """``level``: each window's last observed value per target column (N×K, normalised), when the targets are
        relative to it."""
        outputs, targets = outputs.float(), targets.float()
        errors = (outputs - targets).abs()
        steps = errors.shape[1] // len(self.target_std)
        scale = torch.tensor(self.target_std, device=errors.device).repeat(steps)
        if level is not None:
            shift = level.float().repeat(1, steps)  # step-major: every step, each target column
            outputs, targets = outputs + shift, targets + shift
        cosine = F.cosine_similarity(outputs, targets, dim=1).sum()
        return torch.stack([errors.mean(dim=1).sum(), (errors * scale).mean(dim=1).sum(), cosine]).double()

    def score(self, metrics: dict[str, float]) -> float:
        return -metrics["val/mae"]

    def progress(self, metrics: dict[str, Any]) -> str:
        return f"val/mae {metrics['val/mae']:.4f}  val/cosine {metrics['val/cosine']:.4f}"


Task = Classification | Forecast


def task_of(manifest: Any, label_smoothing: float = 0.0) -> Task:
    """The task a dataset's manifest declares (image sets, which declare none, classify)."""
    if getattr(manifest, "task", "classification") == "forecast":
        return Forecast(tuple(float(std) for std in manifest.target_std))
    return Classification(label_smoothing)


def validation_metrics(task: Task, sums: Tensor, count: int) -> dict[str, float]:
    """``val/<name>``: each summed metric divided by the number of validation samples."""
    return {f"val/{name}": value / count for name, value in zip(task.sums, sums.tolist(), strict=True)}
