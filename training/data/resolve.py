"""Which ``.beton`` files a job reads, checked before any Ray work: what the service's admission and `launch` both
ask. Light on purpose — no ffcv, no Ray — so the API process can import it (the writer is imported only to build
a missing embedded dataset, which the service never does)."""

from dataclasses import dataclass
from pathlib import Path

from san.registry import model_inputs
from training.config import JobSpec
from training.data.catalog import EMBEDDED, dataset_info
from training.data.manifest import load_manifest
from training.paths import data_root, under_root


@dataclass(frozen=True)
class ResolvedData:
    train: Path
    val: Path


def resolve_data(spec: JobSpec, root: Path | None = None, build_missing: bool = True) -> ResolvedData:
    """The job's .beton files, checked before any Ray work: inside the data root, existing with manifests, and
    one global batch fits in the training set. An embedded catalog dataset that is not built yet is built here,
    once — or, with ``build_missing=False`` (the service's check at submission), left for the job to build."""
    root = root or data_root()
    if spec.data.train_path or spec.data.val_path:
        if not (spec.data.train_path and spec.data.val_path):
            raise ValueError("data.train_path and data.val_path are given together")
        train = under_root(spec.data.train_path, root, "data.train_path")
        val = under_root(spec.data.val_path, root, "data.val_path")
    else:
        try:
            dataset_info(spec.data.dataset)
        except ValueError as error:
            raise ValueError(f"data.dataset: {error}") from None
        train, val = root / spec.data.dataset / "train.beton", root / spec.data.dataset / "val.beton"
        if not train.is_file() and spec.data.dataset in EMBEDDED:
            if not build_missing:
                return ResolvedData(train, val)
            from training.data.build import build_dataset  # writing needs ffcv's writer: only here

            build_dataset(spec.data.dataset, None, root / spec.data.dataset)
    for field, path in (("data.train_path", train), ("data.val_path", val)):
        if not path.is_file():
            raise ValueError(f"{field}: {path} does not exist (build it with 'san data build')")
    manifest, val_manifest = load_manifest(train), load_manifest(val)
    if (manifest.kind, manifest.task) != (val_manifest.kind, val_manifest.task):
        raise ValueError(f"data.val_path: a {val_manifest.kind} {val_manifest.task} set, and data.train_path a "
                         f"{manifest.kind} {manifest.task} set")  # fmt: skip
    takes, holds = model_inputs(spec.model.name), "sequences" if manifest.kind == "series" else "images"
    if takes != holds:
        raise ValueError(f"model.name: {spec.model.name} takes {takes}, and data.train_path holds {holds}")
    global_batch = spec.training.batch_size * spec.scaling.num_workers
    if global_batch > manifest.count:
        unit = "series" if manifest.kind == "series" else "images"
        raise ValueError(f"training.batch_size: {spec.training.batch_size} × {spec.scaling.num_workers} workers = "
                         f"{global_batch} is larger than the training set ({manifest.count} {unit})")  # fmt: skip
    return ResolvedData(train, val)
