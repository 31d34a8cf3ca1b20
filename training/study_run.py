"""``san study run SPEC``: a study on the local Ray (or the cluster in ``RAY_ADDRESS``), its children one after
another, a progress line per child, the table at the end — tracked in MLflow as a parent run with nested runs."""

import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from training.launch import connect_ray, launch, resolve_data
from training.paths import storage_root
from training.provenance import command_line, commit, header
from training.report import markdown
from training.states import JobStatus, StudyStatus
from training.study import StudySpec, expand, load_study
from training.study_results import write_results
from training.tasks import METRICS
from training.tracking import create_study_run, finish_study_run, tracking_uri

MAX_CELLS = 200


def run_study(path: str, seeds: int | None = None, epochs: int | None = None, out: Path | None = None) -> int:
    """Run the study in ``path``; its tables and figures go to ``out`` (default: the storage root's
    ``studies/<id>``), with ``run.md``: the command, the dates, the commit and the machine."""
    started, revision = datetime.now(UTC), commit()  # the code that runs is the code at the start
    try:
        study = load_study(path, seeds, epochs)
        for child in expand(study, MAX_CELLS).children:  # every child checked before anything is recorded
            resolve_data(child.spec)
    except (ValueError, FileNotFoundError) as error:
        print(f"san study run: error: {error}", file=sys.stderr)
        return 2
    study_id = f"study-{uuid.uuid4().hex[:12]}"
    root = storage_root()
    uri = tracking_uri(study.base, root)
    parent = create_study_run(uri, study.experiment, root, study_id, study.name, study.model_dump_json(indent=2))
    try:
        return _run_children(study, study_id, parent, uri, root, out, (started, revision))
    except BaseException:  # an error or Ctrl-C: the parent run must not stay RUNNING
        MlflowClient(uri).set_terminated(parent, JobStatus.CANCELLED.mlflow_status())
        raise


def _run_children(
    study: StudySpec, study_id: str, parent: str, uri: str, root: Path, out: Path | None, start: tuple[datetime, str]
) -> int:
    expansion = expand(study, MAX_CELLS, study_id, parent)
    children = expansion.children
    print(f"{study_id}: {len(children)} runs ({sum(c.runs for c in expansion.cells)} cells × {len(study.seeds)} "
          f"seeds); MLflow parent run {parent} at {uri}", flush=True)  # fmt: skip
    if children and not ray.is_initialized():
        connect_ray(max(c.spec.scaling.num_workers * c.spec.scaling.cpus_per_worker for c in children))
    states = {(child.cell, child.seed): JobStatus.QUEUED for child in children}
    for index, child in enumerate(children, 1):
        print(f"[{index}/{len(children)}] {child.spec.run_name} …", flush=True)
        try:
            result = launch(child.spec, f"{study_id}-{index:03d}")
            states[(child.cell, child.seed)] = JobStatus.SUCCEEDED
        except Exception as error:  # one child's failure is a row of the table, not the end of the study
            states[(child.cell, child.seed)] = JobStatus.FAILED
            print(f"[{index}/{len(children)}] {child.spec.run_name} failed: {error}", flush=True)
            continue
        shown = "  ".join(f"{METRICS[name].key} {result.metrics[METRICS[name].key]:.4f}"
                          for name in study.table_metrics if METRICS[name].key in result.metrics)  # fmt: skip
        print(f"[{index}/{len(children)}] {child.spec.run_name} {shown}", flush=True)
    results = out or root / "studies" / study_id
    table = write_results(expansion, uri, parent, results, states)
    (results / "run.md").write_text(header(command_line(), start[0], revision=start[1]))
    failed = any(state == JobStatus.FAILED for state in states.values())
    finish_study_run(uri, parent, results, (StudyStatus.FAILED if failed else StudyStatus.SUCCEEDED).mlflow_status())
    print(markdown(table))
    print(f"tables and figures: {results}  (MLflow parent run {parent})")
    return 1 if failed else 0
