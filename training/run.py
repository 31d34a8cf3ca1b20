"""The entry point Ray Jobs executes:
``python -m training.run SPEC.{yaml,json} [--job-id ID] [--workers N] [--epochs N] [--report-file PATH]
[--admitted]``."""

import argparse
import signal
import sys
from pathlib import Path

from training.config import SpecError, load_spec
from training.driver_log import copied_output, log_path
from training.driver_report import write_report
from training.launch import launch
from training.stop import Cancelled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.run", description=__doc__)
    parser.add_argument("spec", help="a JobSpec as YAML or JSON")
    parser.add_argument("--job-id", help="names the Ray run and tags the MLflow run (default: generated)")
    parser.add_argument("--workers", type=int, help="override scaling.num_workers")
    parser.add_argument("--epochs", type=int, help="override training.epochs")
    parser.add_argument(
        "--report-file",
        type=Path,
        help="where the driver tells the service its MLflow run id and, if the job fails, why (training.driver_report)",
    )
    parser.add_argument(
        "--admitted",
        action="store_true",
        help="the spec is one the service's admission validated: read it back as it is, not checked again",
    )
    args = parser.parse_args(argv)
    if args.report_file:  # run by the service: what the driver prints is also the job's log (training.driver_log)
        with copied_output(log_path(args.report_file)):
            return run(args.spec, args.job_id, args.workers, args.epochs, args.report_file, args.admitted)
    return run(args.spec, args.job_id, args.workers, args.epochs, args.report_file, args.admitted)


def run(
    path: str,
    job_id: str | None,
    workers: int | None = None,
    epochs: int | None = None,
    report_file: Path | None = None,
    admitted: bool = False,
) -> int:
    """Load, launch and say how it ended: on stdout/stderr, and — with ``report_file`` — in the driver's report
    (`training.driver_report`), which the service reads: the run id once it exists, why the job failed if it
    does (Ray Jobs' own message is the tail of the driver's log, which raylet lines can push the reason out of)."""
    try:
        spec = load_spec(path, workers, epochs, admitted)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        if report_file:
            write_report(report_file, error=str(error))
        return 2
    # The workers read the file given when it holds exactly this spec: JSON, nothing overridden.
    given = Path(path) if Path(path).suffix == ".json" and workers is None and epochs is None else None
    try:
        result = launch(spec, job_id, spec_path=given, report=report_file)
    except Exception as error:
        if report_file:
            write_report(report_file, error=f"{type(error).__name__}: {error}")
        raise
    except Cancelled as cancel:  # SIGTERM (Ray Jobs' stop_job): a checkpoint at a step boundary, the run KILLED
        result = cancel.result
        print(f"{result.job_id}: cancelled; checkpoint {result.checkpoint_path}; MLflow run {result.mlflow_run_id} "
              f"KILLED at {result.mlflow_uri}")  # fmt: skip
        return 128 + signal.SIGTERM
    shown = ", ".join(f"{key} {value:.4f}" for key in ("val/top1", "val/top5", "val/cosine", "val/mae")
                      if (value := result.metrics.get(key)) is not None)  # fmt: skip
    print(f"{result.job_id}: {spec.training.epochs} epochs, {shown}; MLflow run {result.mlflow_run_id} at "
          f"{result.mlflow_uri}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
