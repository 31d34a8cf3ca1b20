"""The one job specification: declared once here, used by the CLI, the service, the Ray job and MLflow.

Named, typed sections in the manner of ffcv-imagenet's config; validated once, before any Ray work starts.
"""

import functools
import inspect
import json
import math
import posixpath
import re
import unicodedata
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from san.catalog import ATTENTION_PARAMETERS, BOOL, COMBINES, SMOOTHING_ACTIVATIONS
from san.registry import list_attention, list_models, list_placements, model_inputs
from training.data.catalog import CATALOG

if TYPE_CHECKING:  # torch and the models are imported where models are built, never by validation alone
    import torch

# MLflow 3's limits (mlflow/utils/validation.py, and the SQL store's columns in mlflow/store/tracking/dbmodels/
# models.py): a spec that passes here never meets them in the middle of a job. tests/test_training_config.py checks
# them against the installed MLflow.
MLFLOW_MAX_KEY_LENGTH = 250  # MAX_ENTITY_KEY_LENGTH: tag, param and metric keys
MLFLOW_MAX_TAG_VALUE_LENGTH = 8000  # MAX_TAG_VAL_LENGTH (MLflow truncates longer values silently by default)
MLFLOW_MAX_PARAM_VALUE_LENGTH = 6000  # MAX_PARAM_VAL_LENGTH
MLFLOW_MAX_RUN_NAME_LENGTH = 250  # the runs table's name: String(250)
MLFLOW_MAX_EXPERIMENT_NAME_LENGTH = 256  # the experiments table's name: String(256) (the REST check allows 500)
MLFLOW_KEY_PATTERN = re.compile(r"^[/\w.\- :]*$")  # validate_param_and_metric_name (non-Windows)
MAX_TAGS = 50  # MLflow logs at most 100 tags a batch; the job and a study add their own
MAX_PATH_LENGTH = 1024
SEED_MAX = 2**32 - 1  # numpy's generators and the loaders' uint64 hashes take 0 ≤ seed < 2**32

Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


def no_control_characters(text: str, allow: str = "") -> str:
    """``text``, or ValueError when it holds a NUL or another control character (other than those in ``allow``)."""
    for char in text:
        if unicodedata.category(char) == "Cc" and char not in allow:
            raise ValueError(f"control character {char!r} is not allowed")
    return text


def finite_json(value: Any) -> Any:
    """``value`` (JSON-like), or ValueError naming a NaN or infinite number inside it: a value stored and served
    back as JSON must be one JSON can write."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    for inner in value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ():
        finite_json(inner)
    return value


FiniteJson = Annotated[Any, AfterValidator(finite_json)]


def one_of(name: str, allowed: list[str], what: str) -> str:
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(allowed)}")
    return name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN and ±inf: never a valid setting

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """From a YAML or JSON file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such spec file")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except json.JSONDecodeError as error:
            where = f"line {error.lineno}, column {error.colno}"
            raise ValueError(f"{path}: not valid JSON at {where}: {error.msg}") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
        return cls.model_validate(data or {})


# The attention modules' keyword arguments: which names each module takes, and whether each is a switch (a JSON
# bool), is declared in `san.catalog.ATTENTION_PARAMETERS` (checked against the constructors' signatures by
# tests/test_torch_free.py); the type and bounds of every other kind are here (tests/test_training_config.py checks
# that each has an entry).
MAX_KERNEL_SIZE, MAX_DILATION, MAX_REDUCTION, MAX_GROUPS, MAX_DILATED_CONVS = 15, 16, 1024, 4096, 8


def _odd(size: int) -> int:
    if size % 2 == 0:
        raise ValueError(f"must be odd: a {size}x{size} conv padded by {size // 2} would change the map's size")
    return size


ATTENTION_KWARG_TYPES: dict[str, Any] = {
    "kernel_size": Annotated[StrictInt, Field(ge=1, le=MAX_KERNEL_SIZE)],  # SAN pads "same": any size
    "spatial_kernel_size": Annotated[StrictInt, Field(ge=1, le=MAX_KERNEL_SIZE), AfterValidator(_odd)],  # CBAM
    "dilation": Annotated[StrictInt, Field(ge=1, le=MAX_DILATION)],
    "reduction": Annotated[StrictInt, Field(ge=1, le=MAX_REDUCTION)],
    "num_dilated": Annotated[StrictInt, Field(ge=0, le=MAX_DILATED_CONVS)],
    "smoothing_groups": Annotated[StrictInt, Field(ge=1, le=MAX_GROUPS)] | Literal["depthwise"],
    "smoothing_activation": Literal[SMOOTHING_ACTIVATIONS],
    "combine": Literal[COMBINES],
}
POSITIONAL = ("self", "channels", "prev_channels", "dims")  # set by the backbone at each position, never by users


def attention_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters of attention ``name``'s constructor that a spec may set, read from its signature
    (imports torch): what `san.catalog.ATTENTION_PARAMETERS` must declare."""
    from san.attention import attention_class

    signature = inspect.signature(attention_class(name).__init__, eval_str=True)
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p for n, p in signature.parameters.items() if n not in POSITIONAL and p.kind in keyword}


def attention_kwargs_schema(name: str, parameters: dict[str, str]) -> type[BaseModel]:
    """The schema of ``parameters`` (name → `san.catalog.BOOL` or its entry of `ATTENTION_KWARG_TYPES`)."""
    fields: dict[str, Any] = {}
    for parameter, kind in parameters.items():
        # unset stays unset (the module's default): dumped with exclude_unset
        fields[parameter] = (StrictBool if kind == BOOL else ATTENTION_KWARG_TYPES[kind], None)
    config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    return create_model(f"AttentionKwargs[{name}]", __config__=config, **fields)


ATTENTION_KWARGS: dict[str, type[BaseModel]] = {
    name: attention_kwargs_schema(name, parameters) for name, parameters in ATTENTION_PARAMETERS.items()
}
# "none" builds no module, so its kwargs mean nothing; but a study crosses attention with kwargs (Table IX's base
# cell carries the SAN switches): any argument some module takes, valid as that module takes it.
ATTENTION_KWARGS["none"] = attention_kwargs_schema(
    "none", {k: kind for name in reversed(ATTENTION_PARAMETERS) for k, kind in ATTENTION_PARAMETERS[name].items()}
)


def typed_attention_kwargs(attention: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked against attention ``attention``'s arguments — an unknown name, a wrong type or a value
    out of bounds is a ValidationError located at its key."""
    schema = ATTENTION_KWARGS[attention]
    allowed = ", ".join(schema.model_fields) or "nothing"
    if attention == "none":
        message = "no attention module takes an argument {key}; they take: {allowed}"
    else:
        message = f"attention {attention!r} takes no argument {{key}}; it takes: {{allowed}}"
    unknown = [
        InitErrorDetails(
            type=PydanticCustomError("unknown_argument", message, {"key": repr(key), "allowed": allowed}),
            loc=(key,),
            input=value,
        )
        for key, value in kwargs.items()
        if key not in schema.model_fields
    ]
    if unknown:
        raise ValidationError.from_exception_data("attention_kwargs", unknown)
    return schema.model_validate(kwargs).model_dump(exclude_unset=True)


class ModelSection(Section):
    name: str = "lenet5"  # a registered model: `san.registry.list_models()`, `GET /v1/models`
    attention: str = "none"  # `san.registry.list_attention()`: none, san-c, san-d, cbam, bam, ran
    placement: str = "bottleneck"  # bottleneck (before each down-sampling), full (after every layer), reference
    attention_kwargs: dict[str, Any] = Field(default_factory=dict)  # typed per attention: ATTENTION_KWARGS
    stem: Literal["imagenet", "small"] | None = None  # None: the model's default
    blurpool: bool = False  # ffcv-imagenet's anti-aliased strided convs
    # fused: each attention module as one autograd node that keeps about half the activations for backward
    # (san.kernels' registered ops); stepwise: one node per operation as the papers write it, same results, more memory,
    # faster for SAN and BAM on small CPU maps (docs/decisions/0001-c-kernels.md)
    attention_path: Literal["fused", "stepwise"] = "fused"

    def build(self, num_classes: int, in_chans: int) -> "torch.nn.Module":
        """The model (imports torch and the models: never in the service's API process)."""
        from san.attention import use_fused_paths
        from san.models.blurpool import add_blurpool
        from san.registry import build_model

        kwargs: dict[str, Any] = {"in_chans": in_chans, "attention_kwargs": self.attention_kwargs}
        if self.stem is not None:
            kwargs["stem"] = self.stem
        model = build_model(self.name, num_classes, self.attention, self.placement, **kwargs)
        use_fused_paths(model, self.attention_path == "fused")
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

    @field_validator("attention_kwargs")
    @classmethod
    def _typed_kwargs(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        attention = info.data.get("attention")
        return kwargs if attention is None else typed_attention_kwargs(attention, kwargs)  # None: already an error


class DataSection(Section):
    dataset: str = Field(default="fashion-mnist", max_length=100)  # a catalog name: <data root>/<dataset>/*.beton
    train_path: Path | None = None  # explicit .beton files override the catalog name
    val_path: Path | None = None
    loader_workers: int = Field(default=1, ge=1, le=64)  # FFCV's decoding threads per training worker
    in_memory: bool = True  # FFCV's os_cache: the whole file in memory

    @field_validator("dataset")
    @classmethod
    def _printable(cls, name: str) -> str:
        return no_control_characters(name)

    @field_validator("train_path", "val_path", mode="before")
    @classmethod
    def _sane_path(cls, path: Any) -> Any:
        if isinstance(path, str | Path):
            if len(str(path)) > MAX_PATH_LENGTH:
                raise ValueError(f"longer than {MAX_PATH_LENGTH} characters")
            no_control_characters(str(path))
        return path

    def shape(self) -> tuple[int, int]:
        """(classes, input channels) of the catalog dataset; for explicit files, which only the job reads, the
        largest usual (1000, 3)."""
        info = None if self.train_path or self.val_path else CATALOG.get(self.dataset)
        return (info.num_classes, info.channels) if info else (1000, 3)


class ResolutionSection(Section):
    """Progressive resizing: ``min_res`` until ``start_ramp``, rising linearly to ``max_res`` at ``end_ramp``,
    in steps of ``step`` px. ``None`` sizes mean the data's own (no resizing)."""

    min_res: int | None = Field(default=None, ge=8, le=1024)
    max_res: int | None = Field(default=None, ge=8, le=1024)
    start_ramp: int = Field(default=0, ge=0, le=10_000)
    end_ramp: int = Field(default=0, ge=0, le=10_000)
    step: int = Field(default=32, ge=1, le=1024)
    val_res: int | None = Field(default=None, ge=8, le=1024)

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

    lr: float = Field(default=0.5, gt=0, le=1000)
    schedule: Literal["cyclic", "step", "cosine"] = "cyclic"
    peak_epoch: float = Field(default=2, ge=0)
    step_epochs: int = Field(default=30, ge=1, le=10_000)  # step: multiply by step_ratio every step_epochs
    step_ratio: float = Field(default=0.1, gt=0, le=1)


class OptimizerSection(Section):
    """SGD (the CNN recipes), or Adam with decoupled weight decay (AdamW: the usual choice for recurrent nets, whose
    gradients SGD's single step size serves poorly); ``momentum`` is Adam's β1 there."""

    name: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=5e-5, ge=0, le=1)  # not applied to norm layers and biases
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _nesterov_is_sgd(self) -> Self:
        if self.nesterov and self.name != "sgd":
            raise ValueError(f"nesterov: SGD's option; optimizer {self.name!r} has none")
        return self


class TrainingSection(Section):
    epochs: int = Field(default=16, ge=1, le=10_000)
    batch_size: int = Field(default=512, ge=1, le=65_536)  # per worker
    amp: Literal["none", "bf16", "fp16"] = "none"  # GPU only
    channels_last: bool = False
    seed: Seed = 0


class ValidationSection(Section):
    batch_size: int = Field(default=512, ge=1, le=65_536)
    flip_tta: bool = False  # average the logits of each image and its mirror


class ScalingSection(Section):
    num_workers: int = Field(default=1, ge=1, le=1024)  # Ray Train workers (one process each; DDP across them)
    use_gpu: bool = False  # one GPU per worker, nccl, AMP as `training.amp` says
    cpus_per_worker: int = Field(default=1, ge=1, le=256)


class CheckpointSection(Section):
    every_epochs: int = Field(default=1, ge=1, le=10_000)  # a restart point every N epochs (and at the end)
    keep: int = Field(default=2, ge=1, le=1000)  # the latest K in Ray's storage
    max_failures: int = Field(default=1, ge=0, le=100)  # restarts after a worker failure or a preemption notice


class TrackingSection(Section):
    """Where the run is recorded. Any ``mlflow_uri`` for `san train` (the user's machine); through the service,
    only the MLflow servers its operator configured (service/validation.py). Names and tags within MLflow's limits."""

    # None: sqlite:///<storage root>/mlflow.db
    mlflow_uri: str | None = Field(default=None, min_length=1, max_length=2048)
    experiment: str | None = Field(default=None, min_length=1, max_length=MLFLOW_MAX_EXPERIMENT_NAME_LENGTH)
    # None: <model>-<attention>-<placement>-s<seed>
    run_name: str | None = Field(default=None, min_length=1, max_length=MLFLOW_MAX_RUN_NAME_LENGTH)
    tags: dict[str, str] = Field(default_factory=dict, max_length=MAX_TAGS)
    system_metrics_interval_s: float = Field(default=10.0, ge=0.1, le=3600)  # CPU, memory (and GPU) sampled by rank 0

    @field_validator("mlflow_uri", "experiment")
    @classmethod
    def _printable(cls, text: str | None) -> str | None:
        return None if text is None else no_control_characters(text)

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        if name is not None:
            no_control_characters(name)
            if "/" in name or "\\" in name or ".." in name:
                raise ValueError("a run name holds no path separator ('/', '\\') and no '..'")
        return name

    @field_validator("tags")
    @classmethod
    def _mlflow_tags(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            if not key or len(key) > MLFLOW_MAX_KEY_LENGTH:
                raise ValueError(f"tag key {key[:40]!r}: 1 to {MLFLOW_MAX_KEY_LENGTH} characters")
            if not MLFLOW_KEY_PATTERN.match(key):
                raise ValueError(f"tag key {key[:40]!r}: MLflow takes letters, digits, '_', '-', '.', ' ', ':', '/'")
            normal = posixpath.normpath(key)
            if normal != key or normal == "." or normal.startswith(("..", "/")):
                raise ValueError(f"tag key {key[:40]!r}: MLflow refuses keys that read as another path")
            if len(value) > MLFLOW_MAX_TAG_VALUE_LENGTH:
                raise ValueError(f"tag {key[:40]!r}: longer than MLflow's {MLFLOW_MAX_TAG_VALUE_LENGTH} characters")
            try:
                no_control_characters(value, allow="\t\n\r")
            except ValueError as error:
                raise ValueError(f"tag {key[:40]!r}: {error}") from None
        return tags


# Where and how a run is recorded, not what it trains: the tracking section (its URI is None from `san train` and the
# resolved URI through the service; a study names its children and tags them). The run has its name, experiment and
# tags anyway; as params they would be the only difference between one job launched two ways.
UNRECORDED_SECTIONS = ("tracking",)


# True where another process builds the models (the service's API, whose admission worker does: `service.admission`):
# validation then checks everything but whether the model builds, and the caller asks that of the builder.
MODELS_BUILT_ELSEWHERE: ContextVar[bool] = ContextVar("models_built_elsewhere", default=False)


@functools.lru_cache(maxsize=256)
def count_model_params(model_section: str, num_classes: int, in_chans: int) -> int:
    """The model's parameter count, built on the meta device (shapes only: no memory, no arithmetic). Cached by
    the model section and the data's shape: a ResNet-50 takes ~25 ms to build even there, and the service
    validates every submitted spec. Imports torch: the service calls it in its admission worker."""
    import torch

    with torch.device("meta"):
        model = ModelSection.model_validate_json(model_section).build(num_classes=num_classes, in_chans=in_chans)
    return sum(parameter.numel() for parameter in model.parameters())


def default_experiment(dataset: str) -> str:
    """The MLflow experiment of a job that names none."""
    return f"san/{dataset}"


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
        self._check_model_takes_the_data()
        self._check_model_builds()
        return self

    def _check_model_takes_the_data(self) -> None:
        """A CNN on a catalog time series, or a recurrent model on catalog images, fails here, not in the job."""
        info = None if self.data.train_path or self.data.val_path else CATALOG.get(self.data.dataset)
        if info is None:
            return
        takes, kind = model_inputs(self.model.name), "sequences" if info.kind == "series" else "images"
        if takes != kind:
            fitting = [name for name in list_models() if model_inputs(name) == kind]
            raise ValueError(f"model.name: {self.model.name} takes {takes}, and data.dataset {self.data.dataset!r} "
                             f"holds {kind}; models for {kind}: {', '.join(fitting)}")  # fmt: skip
        # Checked here too, not only when the files are read: an embedded set not built yet is built by the job.
        global_batch = self.training.batch_size * self.scaling.num_workers
        if global_batch > info.train_count:
            raise ValueError(f"training.batch_size: {self.training.batch_size} × {self.scaling.num_workers} workers = "
                             f"{global_batch} is larger than {self.data.dataset}'s training set "
                             f"({info.train_count:,})")  # fmt: skip

    def _check_model_builds(self) -> None:
        """Build the model on the meta device (no memory, no arithmetic) so kwargs its constructors refuse (a
        group count that does not divide the channels, Table IX's undefined ablations) fail here — unless the
        models are built elsewhere (`MODELS_BUILT_ELSEWHERE`)."""
        if MODELS_BUILT_ELSEWHERE.get():
            return
        try:
            self.model_params()
        except Exception as error:  # any constructor failure on bad kwargs
            raise ValueError(f"model: {error}") from None

    def model_params(self) -> int:
        """The model's parameter count for this spec's data (computed on the meta device, cached)."""
        return count_model_params(*self.model_key())

    def model_key(self) -> tuple[str, int, int]:
        """What the model's size depends on: the model section (JSON) and the data's classes and channels."""
        return self.model.model_dump_json(), *self.data.shape()

    def build_model(self, num_classes: int, in_chans: int) -> "torch.nn.Module":
        return self.model.build(num_classes, in_chans)

    @property
    def run_name(self) -> str:
        m = self.model
        return self.tracking.run_name or f"{m.name}-{m.attention}-{m.placement}-s{self.training.seed}"

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or default_experiment(self.data.dataset)

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


def trusted_spec(path: str | Path) -> JobSpec:
    """A spec validated once already (by the service's admission, or by the driver that wrote it for its workers:
    `training.launch.spec_file`), read back and trusted: its fields parsed into the same sections, nothing
    re-derived — the model build on the meta device, the check that costs, is skipped."""
    token = MODELS_BUILT_ELSEWHERE.set(True)
    try:
        return JobSpec.load(path)
    finally:
        MODELS_BUILT_ELSEWHERE.reset(token)


class SpecError(ValueError):
    """A spec file that cannot run, said in one line that names the field."""


def load_spec(path: str, workers: int | None = None, epochs: int | None = None, admitted: bool = False) -> JobSpec:
    """The spec file, with ``--workers``/``--epochs`` applied through validation (so their checks hold too);
    `SpecError` when it is missing or invalid. ``admitted`` (and nothing overridden): validated by the service's
    admission already, read back as it is (`training.loop.trusted_spec`)."""
    try:
        if admitted and workers is None and epochs is None:
            return trusted_spec(path)
        data = JobSpec.load(path).model_dump()
        if workers is not None:
            data["scaling"]["num_workers"] = workers
        if epochs is not None:
            data["training"]["epochs"] = epochs
        return JobSpec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        raise SpecError(f"{'.'.join(str(part) for part in first['loc']) or 'spec'}: {first['msg']}") from None
    except (ValueError, FileNotFoundError) as error:
        raise SpecError(str(error)) from None
