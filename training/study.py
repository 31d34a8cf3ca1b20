"""Studies: one request that stands for a whole table of the paper.

A `StudySpec` is a base `JobSpec`, a grid of axes (dotted JobSpec paths with value lists), the seeds and the
baseline cell. `expand` turns it into cells and child JobSpecs, by the rules users expect:

- cells that are the same network run once and serve every cell they stand for: the base model
  (``attention: none``) does not depend on placement or attention kwargs, and LeNet-5's bottleneck and full
  placements are the same network (the paper's Table IV note). "The same network" is decided by building both
  on the meta device and comparing the architectures, not by a list of special cases;
- a cell the library refuses as undefined (`san.attention.IncompatibleConfiguration`, Table IX's "-") is
  reported as "-" with the reason; any other invalid cell is the user's mistake: a `StudyError` naming the axis.

The result table is built by `training.report` from `Observation` records, read from the children's MLflow runs.
"""

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from training.config import ATTENTION_KWARGS, FiniteJson, JobSpec, ModelSection, Section, Seed
from training.data.catalog import CATALOG
from training.metrics import LOGGED, METRICS, table_metrics

# Set by the study for every child, so never an axis: seeds come from ``seeds``, tracking from the study.
RESERVED_PATHS = ("training.seed", "tracking")
DISPLAY = {"none": "Base Model", "cbam": "CBAM", "bam": "BAM", "san-c": "SAN-c", "san-d": "SAN-d"}
ATTENTION, PLACEMENT, KWARGS = "model.attention", "model.placement", "model.attention_kwargs"
NETWORK_AXES = ("model.name", ATTENTION, PLACEMENT)  # named in the run name already
# The grid's shape, bounded by the schema: a study's cost (cells × seeds) is the product of its axes' sizes, so it is
# computed from them and checked before one cell is built (`StudySpec.size`, `expand`).
MAX_AXES, MAX_AXIS_VALUES = 8, 64
STORED = "stored"  # validation context: a study the service admitted before, re-read (the caps were checked then)


class StudyError(ValueError):
    """A study that cannot run, located like pydantic's errors (``("axes", "model.attention")``)."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(f"{'.'.join(loc)}: {message}")
        self.loc, self.message = loc, message

    def detail(self) -> list[dict]:
        return [{"loc": ["body", *self.loc], "msg": self.message, "type": "value_error"}]

    def __reduce__(self):  # crosses from the service's admission worker process
        return type(self), (self.loc, self.message)


class PaperCell(Section):
    """One of the paper's figures, for the cells whose axis values include ``match`` (a value or its label)."""

    match: dict[str, FiniteJson]
    top1: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)  # percent, as printed
    top5: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    mae: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # in the data's units, as printed
    cosine: float | None = Field(default=None, ge=-1, le=1, allow_inf_nan=False)

    def figures(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in METRICS}


class PaperFigures(Section):
    source: str = Field(max_length=200)  # e.g. "Table IV, FMNIST"
    cells: list[PaperCell] = Field(default_factory=list, max_length=1000)


class StudySpec(Section):
    """A grid of jobs over a base `JobSpec`, repeated over seeds, compared with a baseline cell."""

    name: str = Field(default="study", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = Field(default="", max_length=2000)
    base: JobSpec = Field(default_factory=JobSpec)
    axes: dict[str, list[FiniteJson]] = Field(default_factory=dict)  # in order: the first axis varies slowest
    labels: dict[str, list[str]] = Field(default_factory=dict)  # display labels, one per axis value
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, max_length=100)
    # The cell the others are compared with, by the axis values it has; None: no attention, when that is an axis.
    baseline: dict[str, FiniteJson] | None = None
    paper: PaperFigures | None = None
    # The table's metrics (`training.metrics.METRICS`); None: the paper's for the base dataset's kind and task.
    metrics: list[Literal[tuple(METRICS)]] | None = Field(default=None, min_length=1, max_length=len(METRICS))

    @field_validator("axes")
    @classmethod
    def _known_paths(cls, axes: dict[str, list[Any]], info: ValidationInfo) -> dict[str, list[Any]]:
        stored = bool(info.context and info.context.get(STORED))  # admitted under the caps of its day
        if len(axes) > MAX_AXES and not stored:
            raise ValueError(f"{len(axes)} axes; at most {MAX_AXES}")
        for path, values in axes.items():
            check_path(path)
            if not values:
                raise ValueError(f"axis {path!r} has no values")
            if len(values) > MAX_AXIS_VALUES and not stored:
                raise ValueError(f"axis {path!r} has {len(values)} values; at most {MAX_AXIS_VALUES}")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ValueError(f"axis {path!r} repeats a value")
        base = info.data.get("base")
        if base is not None:  # None: the base is invalid, and that error is reported
            check_attention_kwargs(axes, base)
        return axes

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds repeat a value")
        return seeds

    @model_validator(mode="after")
    def _consistent(self) -> "StudySpec":
        for path, labels in self.labels.items():
            if path not in self.axes:
                raise ValueError(f"labels.{path}: no such axis")
            if len(labels) != len(self.axes[path]):
                raise ValueError(f"labels.{path}: {len(labels)} labels for {len(self.axes[path])} values")
        for path, value in (self.baseline or {}).items():
            if path not in self.axes:
                raise ValueError(f"baseline.{path}: no such axis")
            if value not in self.axes[path]:
                raise ValueError(f"baseline.{path}: {value!r} is not one of the axis' values")
        for cell in self.paper.cells if self.paper else []:
            for path in cell.match:
                if path not in self.axes:
                    raise ValueError(f"paper: match on {path!r}, which is no axis")
        datasets = self.axes.get("data.dataset", [self.base.data.dataset])  # an axis sets every cell's
        tasks = {(info.kind, info.task) for name in datasets if isinstance(name, str) and (info := CATALOG.get(name))}
        if len(tasks) > 1:
            raise ValueError("axis 'data.dataset' mixes kinds of data or tasks ("
                             + ", ".join(sorted(f"{kind} {task}" for kind, task in tasks))
                             + "): one table compares one task's metrics")  # fmt: skip
        task = next(iter(tasks))[1] if tasks else "classification"
        unlogged = [name for name in self.metrics or [] if name not in LOGGED[task]]
        if unlogged:
            raise ValueError(f"metrics: a {task} job logs no {', '.join(unlogged)}; it logs {', '.join(LOGGED[task])}")
        return self

    @property
    def cell_count(self) -> int:
        """The grid's cells (before equal networks are merged): the product of the axes' sizes."""
        return math.prod(len(values) for values in self.axes.values())

    @property
    def size(self) -> int:
        """The most jobs the study can queue: cells × seeds (merging equal networks only makes it fewer)."""
        return self.cell_count * len(self.seeds)

    @property
    def baseline_values(self) -> dict[str, Any]:
        if self.baseline is not None:
            return self.baseline
        return {ATTENTION: "none"} if "none" in self.axes.get(ATTENTION, []) else {}

    @property
    def experiment(self) -> str:
        return self.base.experiment

    @property
    def table_metrics(self) -> tuple[str, ...]:
        if self.metrics:
            return tuple(dict.fromkeys(self.metrics))
        data = self.base.data
        dataset = self.axes.get("data.dataset", [data.dataset])[0]
        info = None if data.train_path or data.val_path else CATALOG.get(dataset) if isinstance(dataset, str) else None
        return table_metrics(info.kind, info.task) if info else table_metrics("image", "classification")

    def label(self, path: str, value: Any) -> str:
        """How a value of an axis is shown: its given label, else a readable form of the value."""
        if path in self.labels:
            return self.labels[path][self.axes[path].index(value)]
        if path == ATTENTION and isinstance(value, str):
            return DISPLAY.get(value, value)
        if isinstance(value, dict):
            return ", ".join(f"{k}={v}" for k, v in value.items()) or "default"
        return str(value)


def load_study(path: str, seeds: int | None = None, epochs: int | None = None) -> StudySpec:
    """The study file with ``--seeds N`` (seeds 0..N-1) and ``--epochs`` applied through validation; ValueError
    in one line naming the field when it is missing or invalid."""
    try:
        data = StudySpec.load(path).model_dump(mode="json")
        if seeds is not None:
            data["seeds"] = list(range(seeds))
        if epochs is not None:
            data["base"]["training"]["epochs"] = epochs
        return StudySpec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "study"
        raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


def check_path(path: str) -> None:
    """A dotted path into a JobSpec: ``section.field``, or ``section.field.key`` inside a dict field."""
    parts = path.split(".")
    if len(parts) not in (2, 3):
        raise ValueError(f"axis {path!r}: write it as section.field, e.g. model.attention")
    section, name = parts[0], parts[1]
    sections = JobSpec.model_fields
    if section not in sections:
        raise ValueError(f"axis {path!r}: no section {section!r}; sections: {', '.join(sections)}")
    fields = sections[section].annotation.model_fields  # type: ignore[union-attr]
    if name not in fields:
        raise ValueError(f"axis {path!r}: {section} has no field {name!r}; fields: {', '.join(fields)}")
    if len(parts) == 3 and not str(fields[name].annotation).startswith("dict"):
        raise ValueError(f"axis {path!r}: {section}.{name} is not a mapping")
    if any(path == reserved or path.startswith(reserved + ".") for reserved in RESERVED_PATHS):
        raise ValueError(f"axis {path!r}: set by the study itself (seeds: use 'seeds')")


def check_attention_kwargs(axes: dict[str, list[Any]], base: JobSpec) -> None:
    """Attention-kwarg axes (``model.attention_kwargs.<name>``, or whole ``model.attention_kwargs`` dicts) checked
    against the constructors of the study's attention modules — the names each takes and their types — before any
    cell is built: ValueError naming the axis."""
    attentions = [
        name
        for name in axes.get(ATTENTION, [base.model.attention])
        if isinstance(name, str) and name in ATTENTION_KWARGS
    ]
    modules = [name for name in attentions if name != "none"] or ["none"]  # "none" alone: any module's argument
    takes = {key for name in modules for key in ATTENTION_KWARGS[name].model_fields}
    for path, values in axes.items():
        if path == KWARGS:
            named = [(key, value) for kwargs in values if isinstance(kwargs, dict) for key, value in kwargs.items()]
        elif path.startswith(KWARGS + "."):
            named = [(path.removeprefix(KWARGS + "."), value) for value in values]
        else:
            continue
        for key, value in named:
            if key not in takes:
                verbs = ("takes", "it takes") if len(modules) == 1 else ("take", "they take")
                raise ValueError(
                    f"axis {path!r}: {', '.join(modules)} {verbs[0]} no argument {key!r}; {verbs[1]}: "
                    f"{', '.join(sorted(takes)) or 'nothing'}"
                )
            try:  # the argument's type and bounds, as the module that declares it takes it
                ATTENTION_KWARGS["none"].model_validate({key: value})
            except ValidationError as error:
                raise ValueError(f"axis {path!r}: {key}={json.dumps(value)[:60]}: {error.errors()[0]['msg']}") from None


@dataclass
class Cell:
    """One combination of axis values. ``runs_as``: the key of the cell whose runs serve this one (itself if it
    runs); ``refused``: why the library cannot build it, when it cannot."""

    key: str
    values: dict[str, Any]
    labels: dict[str, str]
    runs_as: str | None = None
    refused: str | None = None
    spec: JobSpec | None = None  # seed and tracking not yet set
    paper: dict[str, float | None] = field(default_factory=dict)

    @property
    def runs(self) -> bool:
        return self.runs_as == self.key

    def slug(self) -> str:
        """The ablation part of the run name: labels of the axes the run name does not already say."""
        extra = [label for path, label in self.labels.items() if path not in NETWORK_AXES]
        return "-".join(re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() for label in extra)


@dataclass(frozen=True)
class Child:
    cell: str
    seed: int
    spec: JobSpec


@dataclass
class Expansion:
    study: StudySpec
    cells: list[Cell]
    children: list[Child]

    def cell(self, key: str) -> Cell:
        return next(c for c in self.cells if c.key == key)

    def baseline_of(self, cell: Cell) -> Cell | None:
        """The cell this one is compared with: its own values with the baseline's put in."""
        if not self.study.baseline_values:
            return None
        values = {**cell.values, **self.study.baseline_values}
        return next((c for c in self.cells if c.values == values), None)


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    target = data
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def axis_of(study: StudySpec, loc: tuple, message: str = "", cell: dict[str, Any] | None = None) -> tuple[str, ...]:
    """Where an error in a child's field points in the study: the axis that set the field; for an error of the
    whole spec, the axis whose value (in ``cell``) alone makes the base invalid, else the one its message names
    first; else the base."""
    dotted = ".".join(str(part) for part in loc)
    for path in study.axes:
        if dotted == path or dotted.startswith(path + ".") or (dotted and path.startswith(dotted + ".")):
            return ("axes", path)
    if not dotted:
        culprit = _culprit(study, cell or {})
        named = sorted((message.find(path), path) for path in study.axes if path in message)
        if culprit or named:
            return ("axes", culprit or named[0][1])
    for path in study.axes:  # a field the axis implies (data.dataset → data.train_path)
        if loc and path.split(".")[0] == str(loc[0]):
            return ("axes", path)
    return ("base", *(str(part) for part in loc))


def _culprit(study: StudySpec, cell: dict[str, Any]) -> str | None:
    """The axis whose value in ``cell``, set alone on the base, makes an invalid job."""
    for path, value in cell.items():
        data = study.base.model_dump(mode="json")
        set_path(data, path, value)
        try:
            JobSpec.model_validate(data)
        except ValidationError:
            return path
    return None


def network_identity(model: ModelSection, in_chans: int, num_classes: int) -> str:
    """What makes two cells the same network: the architecture built on the meta device, and the attention
    kwargs when it has attention modules at all. Raises `IncompatibleConfiguration` for Table IX's "-". Imports
    torch: the service expands studies in its admission worker."""
    import torch

    from san.attention import attention_modules

    with torch.device("meta"):
        built = model.build(num_classes, in_chans)
    kwargs = json.dumps(model.attention_kwargs, sort_keys=True) if attention_modules(built) else ""
    return repr(built) + kwargs


def _dataset_shape(data: dict[str, Any]) -> tuple[int, int]:
    info = CATALOG.get(data.get("dataset", ""))
    return (info.channels, info.num_classes) if info else (3, 10)


def check_cells(study: StudySpec, max_cells: int) -> None:
    """`StudyError` for more grid cells than ``max_cells``, told from the axes' sizes: nothing is built for a study
    too large to run."""
    if study.cell_count > max_cells:
        sizes = " × ".join(str(len(v)) for v in study.axes.values())
        raise StudyError(
            ("axes",), f"{study.cell_count} cells ({sizes}) is more than this service's limit of {max_cells}"
        )


def expand(study: StudySpec, max_cells: int = 200, study_id: str = "", parent_run_id: str | None = None) -> Expansion:
    """The study's cells and child jobs (children in grid order, seeds innermost), or `StudyError`. Builds every
    cell's model on the meta device: imports torch."""
    from san.attention import IncompatibleConfiguration

    paths = list(study.axes)
    check_cells(study, max_cells)
    grid = itertools.product(*study.axes.values())  # lazily: one cell at a time
    base = study.base.model_dump(mode="json")
    cells: list[Cell] = []
    identities: dict[str, str] = {}  # canonical job (less seed and tracking) → the key of the cell that runs it
    for index, combo in enumerate(grid):
        values = dict(zip(paths, combo, strict=True))
        labels = {path: study.label(path, value) for path, value in values.items()}
        if values.get(ATTENTION) == "none":  # kwargs of no attention mean nothing: don't label the base with them
            labels.pop(KWARGS, None)
        cell = Cell(f"c{index:03d}", values, labels)
        cells.append(cell)
        data = json.loads(json.dumps(base))
        for path, value in values.items():
            set_path(data, path, value)
        try:
            model = ModelSection.model_validate(data["model"])
            in_chans, num_classes = _dataset_shape(data.get("data", {}))
            identity = network_identity(model, in_chans, num_classes)
        except IncompatibleConfiguration as error:
            cell.refused = str(error)
            continue
        except ValidationError as error:
            first = error.errors()[0]
            raise StudyError(axis_of(study, ("model", *first["loc"])), first["msg"]) from None
        except Exception as error:  # a constructor's own failure on bad kwargs (e.g. a zero reduction) is input too
            message = f"{type(error).__name__}: {error}"
            raise StudyError(axis_of(study, ("model", "attention_kwargs")), message) from None
        try:
            spec = JobSpec.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            message = first["msg"].removeprefix("Value error, ")
            raise StudyError(axis_of(study, first["loc"], message, values), message) from None
        data["model"] = identity
        data["training"].pop("seed", None)
        data.pop("tracking", None)
        canonical = json.dumps(data, sort_keys=True)
        cell.runs_as = identities.setdefault(canonical, cell.key)
        cell.spec = spec
        cell.paper = paper_figures(study, cell)
    expansion = Expansion(study, cells, [])
    expansion.children = [Child(cell.key, seed, child_spec(study, cell, seed, study_id, parent_run_id))
                          for cell in cells if cell.runs for seed in study.seeds]  # fmt: skip
    return expansion


def paper_figures(study: StudySpec, cell: Cell) -> dict[str, float | None]:
    for figure in study.paper.cells if study.paper else []:
        if all(cell.values.get(path) == want or cell.labels.get(path) == want for path, want in figure.match.items()):
            return figure.figures()
    return {}


def child_spec(study: StudySpec, cell: Cell, seed: int, study_id: str, parent_run_id: str | None) -> JobSpec:
    """The cell's job for one seed: named ``<model>-<attention>-<placement>-s<seed>`` (+ the ablation label),
    in the study's experiment, tagged with the study, the cell and the seed, nested under the parent run."""
    assert cell.spec is not None
    m = cell.spec.model
    name = f"{m.name}-{m.attention}-{m.placement}-s{seed}" + (f"-{cell.slug()}" if cell.slug() else "")
    tags = {**study.base.tracking.tags, "san.study_id": study_id, "san.cell": cell.key, "san.seed": str(seed)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tracking = cell.spec.tracking.model_copy(update={"run_name": name[:250], "experiment": study.experiment,
                                                     "tags": tags})  # fmt: skip
    training = cell.spec.training.model_copy(update={"seed": seed})
    return cell.spec.model_copy(update={"tracking": tracking, "training": training})


@dataclass(frozen=True)
class Observation:
    """What one child's run says: its state, per-epoch metrics (from MLflow) and the model's size."""

    cell: str
    seed: int
    state: str  # a `training.states.JobStatus`: succeeded, running, queued, failed or cancelled
    history: list[dict[str, float]]
    params: int | None = None
    run_id: str | None = None
