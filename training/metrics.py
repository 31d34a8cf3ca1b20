"""The tasks' names and the validation metrics a study's table shows, by task — no torch, so the service's API
process reads them; the losses and the metrics' arithmetic are `training.tasks`'."""

from dataclasses import dataclass
from enum import StrEnum

TASKS = ("classification", "forecast")


@dataclass(frozen=True)
class Metric:
    """A validation metric as a study table shows it."""

    key: str  # the MLflow metric
    title: str
    percent: bool  # a fraction shown ×100
    higher_is_better: bool


METRICS = {
    "top1": Metric("val/top1", "Top-1", True, True),
    "top5": Metric("val/top5", "Top-5", True, True),
    "mae": Metric("val/mae", "MAE", False, False),
    "cosine": Metric("val/cosine", "cos. sim.", False, True),
}

MetricName = StrEnum("MetricName", {name: name for name in METRICS})  # the names, for a query parameter's choices

LOGGED = {"classification": ("top1", "top5", "mae"), "forecast": ("cosine", "mae")}  # what each task logs


def table_metrics(kind: str, task: str) -> tuple[str, ...]:
    """The paper's columns for a kind of data: Tables I–V top-1/top-5; Table VI accuracy and MAE loss; Table VII
    cosine similarity and MAE."""
    if task == "forecast":
        return ("cosine", "mae")
    return ("top1", "mae") if kind == "series" else ("top1", "top5")
