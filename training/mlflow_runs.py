"""The MLflow calls that need no torch: a job's experiment and run created and ended by the driver, a study's
parent run, its children's runs and their metric histories — what the service's API process calls. Rank 0's
logging (models, attention maps: torch) is `training.tracking`'s, which re-exports these."""

from pathlib import Path

import numpy as np
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from training.config import JobSpec
from training.paths import default_tracking_uri
from training.provenance import git
from training.states import JobStatus

METRIC_KEYS = (
    "train/loss",
    "val/loss",
    "val/top1",
    "val/top5",
    "val/mae",
    "val/cosine",
    "time/epoch_s",
    "throughput/img_s",
    "lr",
    "resolution",
)


def tracking_uri(spec: JobSpec, storage_root: Path) -> str:
    return spec.tracking.mlflow_uri or default_tracking_uri(storage_root)


def git_commit() -> str:
    return git("rev-parse", "HEAD") or "unknown"


# MLflow 3's UI opens an experiment in its GenAI view unless the experiment says it trains models.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(client: MlflowClient, name: str, storage_root: Path) -> str:
    """The experiment's id, created and tagged as model development, or tagged so if it was created without.

    On a local store (SQLite, files) the artifact location is explicit, under the storage root, so every process
    agrees on paths; a tracking server chooses its own (with ``--serve-artifacts``, its artifact store proxied
    through it, so workers need no storage credentials)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        served = client.tracking_uri.startswith(("http://", "https://"))
        artifacts = None if served else (Path(storage_root).resolve() / "mlartifacts").as_uri()
        return client.create_experiment(name, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def create_run(spec: JobSpec, storage_root: Path, job_id: str, ray_run_name: str) -> tuple[str, str]:
    """In the driver: the experiment (with an explicit artifact location, so every process agrees on paths) and a
    run holding the flat spec as params and the job's tags — or, for a job id that has a run already, that run,
    which the resumed training continues. Returns (tracking URI, run id)."""
    uri = tracking_uri(spec, storage_root)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, spec.experiment, storage_root)
    earlier = client.search_runs([experiment_id], f"tags.`san.job_id` = '{job_id}'", max_results=1)
    if earlier:  # the same job again (the service resubmitted it after its cluster was lost): the same run
        client.update_run(earlier[0].info.run_id, status="RUNNING")
        return uri, earlier[0].info.run_id
    tags = {**spec.tracking.tags, "san.job_id": job_id, "git.commit": git_commit(), "ray.run_name": ray_run_name}
    run = client.create_run(experiment_id, run_name=spec.run_name, tags=tags)
    params = [Param(key, value[:6000]) for key, value in spec.flat().items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    client.log_text(run.info.run_id, spec.model_dump_json(indent=2), "spec.json")
    return uri, run.info.run_id


ATTENTION_MAPS = "attention/maps.npz"


def end_run(uri: str, run_id: str, status: str) -> None:
    """In the driver: end the job's run as ``FAILED`` or ``KILLED`` (the workers cannot, once they are gone)."""
    MlflowClient(uri).set_terminated(run_id, status)


def create_study_run(uri: str, experiment: str, storage_root: Path, study_id: str, name: str, spec_json: str) -> str:
    """The study's parent run (its children nest under it by their ``mlflow.parentRunId`` tag), holding the study
    spec; returns its id."""
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, experiment, storage_root)
    tags = {"san.study_id": study_id, "san.kind": "study", "git.commit": git_commit()}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.log_text(run.info.run_id, spec_json, "study.json")
    return run.info.run_id


def study_child_runs(uri: str, parent_run_id: str) -> list:
    """The runs nested under a study's parent run, oldest first."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs, token = [], None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            return runs


def metric_history(client: MlflowClient, run_id: str, keys: tuple[str, ...] = METRIC_KEYS) -> list[dict[str, float]]:
    """One row per epoch, ``{"epoch": k, "train/loss": …, "val/top1": …, …}``, in epoch order."""
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            rows.setdefault(metric.step, {})[key] = metric.value
    return [{"epoch": step, **rows[step]} for step in sorted(rows)]


def end_unfinished_runs(uri: str, runs: dict[str, str]) -> None:
    """``{run id: job state}``: end as FAILED or KILLED the runs still RUNNING whose job failed or was cancelled (a
    driver stopped on Ray cannot end its own run)."""
    client = MlflowClient(uri)
    for run_id, state in runs.items():
        ended = JobStatus(state)
        if ended in (JobStatus.FAILED, JobStatus.CANCELLED) and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, ended.mlflow_status())


def download_attention_maps(uri: str, run_id: str, directory: Path) -> dict[str, np.ndarray] | None:
    try:
        path = MlflowClient(uri).download_artifacts(run_id, ATTENTION_MAPS, str(directory))
    except Exception:  # a run without attention, or one that ended before logging them
        return None
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def finish_study_run(uri: str, run_id: str, results: Path, status: str) -> None:
    """Log the study's results directory (tables, figures) on its parent run and end it with ``status``."""
    client = MlflowClient(uri)
    client.log_artifacts(run_id, str(results), artifact_path="results")
    client.set_terminated(run_id, status)
