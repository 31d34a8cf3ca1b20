"""The one job specification: declared once here, used by the CLI, the service, the Ray job and MLflow.

Named, typed sections in the manner of ffcv-imagenet's config; validated once, before any Ray work starts.
"""

import functools
import json
from pathlib import Path
from typing import Any, Literal, Self

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from san.models.blurpool import add_blurpool
from san.registry import build_model, list_attention, list_models, list_placements


def one_of(name: str, allowed: list[str], what: str) -> str:
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(allowed)}")
    return name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """From a YAML or JSON file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such spec file")
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return cls.model_validate(data or {})


class ModelSection(Section):
    name: str = "lenet5"
    attention: str = "none"
    placement: str = "bottleneck"
    attention_kwargs: dict[str, Any] = Field(default_factory=dict)
    stem: Literal["imagenet", "small"] | None = None  # None: the model's default
    blurpool: bool = False  # ffcv-imagenet's anti-aliased strided convs

    def build(self, num_classes: int, in_chans: int) -> torch.nn.Module:
        kwargs: dict[str, Any] = {"in_chans": in_chans, "attention_kwargs": self.attention_kwargs}
        if self.stem is not None:
            kwargs["stem"] = self.stem
        model = build_model(self.name, num_classes, self.attention, self.placement, **kwargs)
        if self.blurpool:
            add_blurpool(model)
        return model

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return one_of(name, list_models(), "model")

    @field_validator("attention")
    @classmethod
    def _known_attention(cls, name: str) -> str:
        return one_of(name, list_attention(), "attention")

    @field_validator("placement")
    @classmethod
    def _known_placement(cls, name: str) -> str:
        return one_of(name, list_placements(), "placement")


class DataSection(Section):
    dataset: str = "fashion-mnist"  # a catalog name, resolved to <data root>/<dataset>/{train,val}.beton
    train_path: Path | None = None  # explicit .beton files override the catalog name
    val_path: Path | None = None
    loader_workers: int = Field(default=1, ge=1, le=64)
    in_memory: bool = True


class ResolutionSection(Section):
    """Progressive resizing: ``min_res`` until ``start_ramp``, rising linearly to ``max_res`` at ``end_ramp``,
    in steps of ``step`` px. ``None`` sizes mean the data's own (no resizing)."""

    min_res: int | None = Field(default=None, ge=8)
    max_res: int | None = Field(default=None, ge=8)
    start_ramp: int = Field(default=0, ge=0)
    end_ramp: int = Field(default=0, ge=0)
    step: int = Field(default=32, ge=1)
    val_res: int | None = Field(default=None, ge=8)

    @model_validator(mode="after")
    def _ordered(self) -> "ResolutionSection":
        if (self.min_res is None) != (self.max_res is None):
            raise ValueError("resolution.min_res and resolution.max_res are set together")
        if self.min_res is not None and self.min_res > self.max_res:
            raise ValueError(f"resolution.min_res {self.min_res} > max_res {self.max_res}")
        if self.end_ramp < self.start_ramp:
            raise ValueError(f"resolution.end_ramp {self.end_ramp} < start_ramp {self.start_ramp}")
        return self


class LRSection(Section):
    """``lr`` is per 256 images of global batch (scaled linearly); ``cyclic`` rises from 0 to the peak at
    ``peak_epoch`` and falls to 0 at the end, per iteration (ffcv-imagenet's triangle)."""

    lr: float = Field(default=0.5, gt=0)
    schedule: Literal["cyclic", "step", "cosine"] = "cyclic"
    peak_epoch: float = Field(default=2, ge=0)
    step_epochs: int = Field(default=30, ge=1)  # step: multiply by step_ratio every step_epochs
    step_ratio: float = Field(default=0.1, gt=0, le=1)


class OptimizerSection(Section):
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=5e-5, ge=0)  # not applied to norm layers and biases
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)


class TrainingSection(Section):
    epochs: int = Field(default=16, ge=1, le=10_000)
    batch_size: int = Field(default=512, ge=1, le=65_536)  # per worker
    amp: Literal["none", "bf16", "fp16"] = "none"  # GPU only
    channels_last: bool = False
    seed: int = 0


class ValidationSection(Section):
    batch_size: int = Field(default=512, ge=1, le=65_536)
    flip_tta: bool = False  # average the logits of each image and its mirror


class ScalingSection(Section):
    num_workers: int = Field(default=1, ge=1, le=1024)
    use_gpu: bool = False
    cpus_per_worker: int = Field(default=1, ge=1, le=256)


class CheckpointSection(Section):
    every_epochs: int = Field(default=1, ge=1)
    keep: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=0)


class TrackingSection(Section):
    mlflow_uri: str | None = None  # None: sqlite:///<storage root>/mlflow.db
    experiment: str | None = None  # None: san/<dataset>
    run_name: str | None = None  # None: <model>-<attention>-<placement>-s<seed>
    tags: dict[str, str] = Field(default_factory=dict)
    system_metrics_interval_s: float = Field(default=10.0, gt=0)  # CPU, memory (and GPU) sampled by rank 0


# Where and how a run is recorded, not what it trains: the tracking section (its URI is None from `san train` and the
# resolved URI through the service; a study names its children and tags them). The run has its name, experiment and
# tags anyway; as params they would be the only difference between one job launched two ways.
UNRECORDED_SECTIONS = ("tracking",)


@functools.lru_cache(maxsize=256)
def _model_builds(model_section: str) -> bool:
    """Cached by the model section alone: a ResNet-50 takes ~25 ms to build even on the meta device, and the
    service validates every submitted spec."""
    with torch.device("meta"):
        ModelSection.model_validate_json(model_section).build(num_classes=10, in_chans=3)
    return True


class JobSpec(Section):
    """A training job: what to train, on what, how, where it runs and where it is recorded."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    resolution: ResolutionSection = Field(default_factory=ResolutionSection)
    lr: LRSection = Field(default_factory=LRSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if self.training.amp != "none" and not self.scaling.use_gpu:
            raise ValueError(
                f"training.amp={self.training.amp!r} needs scaling.use_gpu=true (mixed precision: GPU only)"
            )
        if self.lr.schedule == "cyclic" and self.lr.peak_epoch > self.training.epochs:
            raise ValueError(f"lr.peak_epoch {self.lr.peak_epoch} is after the last epoch ({self.training.epochs})")
        self._check_model_builds()
        return self

    def _check_model_builds(self) -> None:
        """Build the model on the meta device (no memory, no arithmetic) so bad attention kwargs fail here."""
        try:
            _model_builds(self.model.model_dump_json())
        except Exception as error:  # any constructor failure on bad kwargs (a zero reduction divides by zero)
            raise ValueError(f"model: {error}") from None

    def build_model(self, num_classes: int, in_chans: int) -> torch.nn.Module:
        return self.model.build(num_classes, in_chans)

    @property
    def run_name(self) -> str:
        m = self.model
        return self.tracking.run_name or f"{m.name}-{m.attention}-{m.placement}-s{self.training.seed}"

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or f"san/{self.data.dataset}"

    def flat(self) -> dict[str, str]:
        """``{"model.name": "lenet5", ...}``: the spec as flat strings, for MLflow params — less where the run is
        recorded (`UNRECORDED_SECTIONS`), so the same job launched two ways logs the same params."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and prefix.count(".") < 1:
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, inner)
            else:
                flat[prefix] = json.dumps(value) if isinstance(value, dict | list) else str(value)

        walk("", self.model_dump(mode="json", exclude=set(UNRECORDED_SECTIONS)))
        return flat
