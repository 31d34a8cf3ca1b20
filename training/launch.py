"""From a JobSpec to a finished Ray Train run: data resolved and checked, the MLflow run created, the
TorchTrainer built (scaling, storage, checkpoints, failures) and fitted."""

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from training.config import JobSpec
from training.data.catalog import EMBEDDED, dataset_info
from training.data.manifest import load_manifest
from training.loop import FAIL_ONCE_ENV, train_worker
from training.paths import data_root, storage_root, under_root
from training.tracking import create_run


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
    manifest = load_manifest(train)
    global_batch = spec.training.batch_size * spec.scaling.num_workers
    if global_batch > manifest.count:
        raise ValueError(f"training.batch_size: {spec.training.batch_size} × {spec.scaling.num_workers} workers = "
                         f"{global_batch} is larger than the training set ({manifest.count} images)")  # fmt: skip
    return ResolvedData(train, val)


def build_trainer(spec: JobSpec, data: ResolvedData, job_id: str, root: Path, mlflow_uri: str, run_id: str):
    env_vars = {FAIL_ONCE_ENV: os.environ[FAIL_ONCE_ENV]} if FAIL_ONCE_ENV in os.environ else {}
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "train_path": str(data.train),
            "val_path": str(data.val),
            "mlflow_uri": mlflow_uri,
            "mlflow_run_id": run_id,
            "torch_threads": spec.scaling.cpus_per_worker,
        },
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker={"CPU": spec.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=job_id,
            storage_path=str(root / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            # A worker group that cannot start (a node lost and no capacity left for its workers) is a controller
            # failure, which Ray retries forever by default: counted like a worker failure instead, the job ends
            # with Ray's "startup timed out … waiting for N workers" rather than waiting for capacity that may never
            # come (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default, is each attempt's patience).
            failure_config=FailureConfig(
                max_failures=spec.checkpoint.max_failures, controller_failure_limit=spec.checkpoint.max_failures
            ),
            worker_runtime_env={"env_vars": env_vars} if env_vars else None,
        ),
    )


@dataclass(frozen=True)
class JobResult:
    job_id: str
    mlflow_uri: str
    mlflow_run_id: str
    metrics: dict
    checkpoint_path: str | None


def connect_ray(cpus_needed: int) -> None:
    """Attach to the cluster at ``$RAY_ADDRESS``, else start a local one with this machine's cores (at least
    ``cpus_needed``) and its dashboard."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # The dashboard serves the State API, which Ray Train's placement-group cleaner asks every second whether
        # the controller still lives; without it the cleaner logs a warning every second, all run long.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed), include_dashboard=True)


def launch(spec: JobSpec, job_id: str | None = None, root: Path | None = None, data: Path | None = None) -> JobResult:
    """Validate, record and run ``spec`` on the Ray cluster this process is attached to (or a local one)."""
    job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
    root = root or storage_root()
    resolved = resolve_data(spec, data)
    mlflow_uri, run_id = create_run(spec, root, job_id, ray_run_name=job_id)
    if not ray.is_initialized():
        connect_ray(spec.scaling.num_workers * spec.scaling.cpus_per_worker)
    result = build_trainer(spec, resolved, job_id, root, mlflow_uri, run_id).fit()
    if result.error:
        raise result.error
    return JobResult(job_id, mlflow_uri, run_id, dict(result.metrics or {}),
                     result.checkpoint.path if result.checkpoint else None)  # fmt: skip
