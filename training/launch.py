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
from training.data.manifest import write_atomically
from training.data.resolve import ResolvedData, resolve_data
from training.driver_report import write_report
from training.paths import storage_root
from training.states import JobStatus
from training.stop import Cancelled, StopOnSignal, stop_file
from training.tracking import create_run, end_run

SPEC_FILE = "spec.json"


KILLED = JobStatus.CANCELLED.mlflow_status()  # how a cancelled job's run ends


def spec_file(spec: JobSpec, root: Path, job_id: str, given: Path | None = None) -> Path:
    """The file each worker reads ``spec`` from (`training.config.trusted_spec`: parsed, not checked again).
    ``given``, a JSON file holding exactly ``spec`` (the service's ``jobs/<id>/spec.json``), when it lies on the
    storage root every node shares; else the spec written once, atomically, into the run's own directory there,
    beside Ray's checkpoints (``<root>/ray/<job id>/spec.json``): every worker can read it, it lives and goes with
    the run, and a user's folder (a YAML beside the configs, perhaps on this machine only) gets no stray file."""
    root = Path(root).resolve()
    if given is not None and Path(given).resolve().is_relative_to(root):
        return Path(given).resolve()
    path = root / "ray" / job_id / SPEC_FILE
    write_atomically(path, lambda temp: temp.write_text(spec.model_dump_json()))
    return path


# Ray Train V2's controller takes a worker's `ray.train.report` only when it polls the workers, every 2 s by
# default, and a worker's next report waits for that: every epoch took at least 2 s (the time series' 0.1 s epochs,
# 20× longer). Polled every 0.2 s, an epoch costs what it computes; set it in the environment to choose another.
REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


def run_worker(config: dict) -> None:
    """What each Ray Train worker runs: `training.loop.train_worker`, imported there — the driver needs neither
    FFCV nor the loop, and importing them cost each job's driver seconds before it reached Ray."""
    from training.loop import train_worker

    train_worker(config)


def build_trainer(
    spec: JobSpec,
    data: ResolvedData,
    job_id: str,
    root: Path,
    mlflow_uri: str,
    run_id: str,
    spec_path: Path,
):
    """Ray Train's trainer of ``spec``: each worker runs `run_worker` on the spec at ``spec_path`` (`spec_file`)."""
    return TorchTrainer(
        run_worker,
        train_loop_config={
            "spec_path": str(spec_path),
            "train_path": str(data.train),
            "val_path": str(data.val),
            "mlflow_uri": mlflow_uri,
            "mlflow_run_id": run_id,
            "torch_threads": spec.scaling.cpus_per_worker,
            "stop_file": str(stop_file(root, job_id)),  # the cancel marker rank 0 watches (training.stop)
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


def launch(
    spec: JobSpec,
    job_id: str | None = None,
    root: Path | None = None,
    data: Path | None = None,
    spec_path: Path | None = None,
    report: Path | None = None,
) -> JobResult:
    """Validate, record and run ``spec`` on the Ray cluster this process is attached to (or a local one). SIGTERM
    meanwhile (Ray Jobs' ``stop_job``) cancels: the workers checkpoint at the step boundary where they next agree
    (`training.stop`) and stop, the run ends KILLED, and `training.stop.Cancelled` (a BaseException) carries the
    result. ``spec_path``: the JSON file ``spec`` was read from, if nothing changed it (see `spec_file`);
    ``report``: the driver's report (`training.driver_report`), given the MLflow run id as soon as it exists."""
    job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)  # before the trainer: its controller inherits it
    root = root or storage_root()
    resolved = resolve_data(spec, data)
    spec_path = spec_file(spec, root, job_id, spec_path)
    mlflow_uri, run_id = create_run(spec, root, job_id, ray_run_name=job_id)
    if report:
        write_report(report, mlflow_run_id=run_id)
    if not ray.is_initialized():
        connect_ray(spec.scaling.num_workers * spec.scaling.cpus_per_worker)
    # Installed after ray.init, which sets its own SIGTERM handler (sys.exit) in the driver.
    with StopOnSignal(stop_file(root, job_id), on_stop=lambda: end_run(mlflow_uri, run_id, KILLED)) as stop:
        result = build_trainer(spec, resolved, job_id, root, mlflow_uri, run_id, spec_path).fit()
    outcome = JobResult(job_id, mlflow_uri, run_id, dict(result.metrics or {}),
                        result.checkpoint.path if result.checkpoint else None)  # fmt: skip
    if stop.requested:
        end_run(mlflow_uri, run_id, KILLED)  # again: rank 0 may have finished the run meanwhile
        raise Cancelled(outcome)
    if result.error:
        end_run(mlflow_uri, run_id, JobStatus.FAILED.mlflow_status())
        raise result.error
    return outcome
