"""Where a job's files live: the data root (datasets users may name) and the storage root (Ray runs, MLflow,
the service's records), each from its environment variable, and the check that keeps user paths inside."""

import os
from pathlib import Path

DATA_ROOT_ENV, STORAGE_ROOT_ENV = "SAN_DATA_ROOT", "SAN_STORAGE_ROOT"


def data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "data")).resolve()


def storage_root() -> Path:
    return Path(os.environ.get(STORAGE_ROOT_ENV, "runs")).resolve()


def under_root(path: Path, root: Path, field: str) -> Path:
    """``path`` resolved under ``root`` (relative paths are relative to it); anything outside is refused."""
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{field}: {path} is outside the data root {root}")
    return resolved


def default_tracking_uri(root: Path) -> str:
    """The MLflow store of a job that names none: SQLite under the storage root."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
