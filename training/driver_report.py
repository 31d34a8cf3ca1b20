"""The one channel from a job's driver back to the service: a small JSON file beside the job's spec, on the storage
both share, rewritten whole (temp file and rename) each time the driver has something to say — its MLflow run id as
soon as the run exists, why it failed when it does. The service's dispatcher reads it while reconciling; nothing
else is asked (no MLflow tag search, no side file per fact)."""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from training.data.manifest import write_atomically

REPORT_FILE = "report.json"
MAX_ERROR_CHARS = 4000  # whole enough to name the cause; Ray's own message is the log's tail, often raylet lines


class DriverReport(BaseModel):
    model_config = ConfigDict(extra="ignore")

    mlflow_run_id: str | None = None
    error: str | None = None


def report_path(spec_path: Path) -> Path:
    return Path(spec_path).with_name(REPORT_FILE)


def read_report(path: Path) -> DriverReport | None:
    """What the driver said so far, or None when it said nothing (yet) or the file is not a report."""
    try:
        return DriverReport.model_validate_json(Path(path).read_bytes())
    except (OSError, ValidationError):
        return None


def write_report(path: Path, **said: str | None) -> DriverReport:
    """Add ``said`` (``mlflow_run_id``, ``error``) to the report at ``path``, atomically."""
    current = read_report(path) or DriverReport()
    if said.get("error"):
        said["error"] = said["error"][:MAX_ERROR_CHARS]
    report = current.model_copy(update=said)
    write_atomically(Path(path), lambda temp: temp.write_text(report.model_dump_json()))
    return report
