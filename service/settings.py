"""The service's settings, from ``SAN_*`` environment variables or an env file (pydantic-settings).

Tokens are stored hashed: ``SAN_TOKENS='{"alice": "sha256:<hex>"}'``; make a hash with ``san jobs hash-token``.
"""

import sys
from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.paths import data_root, default_tracking_uri, storage_root


def uri_key(uri: str) -> str:
    """What two spellings of one tracking URI share: ``http://mlflow:5000/`` is ``http://mlflow:5000``."""
    return uri.strip().rstrip("/")


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAN_", extra="ignore")

    database_url: str | None = None  # None: sqlite:///<storage root>/service.db; PostgreSQL by URL
    # "local": start (and stop, by PID) a Ray head with dashboard; otherwise the head's dashboard URL.
    ray_address: str = "local"
    ray_auth_token: SecretStr | None = None  # None: $RAY_AUTH_TOKEN, then the token file Ray wrote
    local_ray_cpus: int | None = Field(default=None, ge=1)  # None: this machine's cores
    local_ray_port: int = 6380
    local_ray_dashboard_port: int = 8265
    mlflow_uri: str | None = None  # jobs that name none are tracked here; None: sqlite under the storage root
    mlflow_ui_url: str | None = None  # for links in job views, e.g. http://127.0.0.1:5000
    # Other MLflow tracking URIs a spec may name (JSON list): a job logs to the default or one of these, never to a
    # URI of the user's choosing — the API would open it too, to read the job's metrics.
    mlflow_allowed_uris: list[str] = Field(default_factory=list)
    # Hosts (``host`` or ``host:port``, JSON list) webhooks may be sent to; empty: no webhooks (service.webhooks).
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    max_model_params: int = Field(default=200_000_000, ge=1)  # parameters of a job's model (counted on meta)
    data_root: Path = Field(default_factory=data_root)
    storage_root: Path = Field(default_factory=storage_root)
    python: str = sys.executable  # the interpreter the Ray job runs (the cluster's venv)
    tokens: dict[str, str] = Field(default_factory=dict)  # principal → "sha256:<hex>"
    max_submitted: int = Field(default=1, ge=0)  # jobs on Ray at once; the rest wait in the queue
    # A job its Ray cluster lost (a head restarted empty) is resubmitted and resumes from its checkpoint, this
    # many times; once more and it fails saying so.
    max_interruptions: int = Field(default=3, ge=0)
    job_stop_wait_s: float = Field(default=60, gt=0, le=3600)  # a cancelled job's time to checkpoint before SIGKILL
    poll_interval_s: float = Field(default=2.0, gt=0)
    max_epochs: int = Field(default=1000, ge=1)
    max_batch_size: int = Field(default=4096, ge=1)
    max_workers: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    max_study_cells: int = Field(default=200, ge=1)  # grid cells of one study (before merging equal networks)
    max_study_jobs: int = Field(default=1000, ge=1)  # cells × seeds of one study (a larger one: 422)
    # Each principal's share (more: 429 with Retry-After): jobs not yet ended (queued, on Ray, interrupted; a study's
    # children count), and studies running at once.
    max_jobs_per_principal: int = Field(default=2000, ge=1)
    max_studies_per_principal: int = Field(default=10, ge=1)
    retry_after_s: int = Field(default=60, ge=1)  # what a 429 tells the caller to wait
    # A study's admission builds each cell's model on the meta device, in a worker process, within this bound.
    admission_timeout_s: float = Field(default=60, gt=0, le=3600)

    @field_validator("data_root", "storage_root")
    @classmethod
    def absolute(cls, path: Path) -> Path:
        return path.resolve()  # once here, not on every request that checks a path against a root

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.storage_root / 'service.db'}"

    @cached_property
    def default_mlflow_uri(self) -> str:
        """Where jobs that name no MLflow URI are tracked: ``mlflow_uri``, else SQLite under the storage root."""
        return self.mlflow_uri or default_tracking_uri(self.storage_root)

    @cached_property
    def mlflow_uris(self) -> dict[str, str]:
        """The MLflow tracking URIs this service configured, by their comparison key (`uri_key`): the default and
        the allowed ones."""
        return {uri_key(uri): uri for uri in [self.default_mlflow_uri, *self.mlflow_allowed_uris]}

    def configured_mlflow_uri(self, uri: str | None) -> str:
        """The configured spelling of ``uri`` (None: the default); ValueError for a URI this service did not
        configure."""
        if uri is None:
            return self.default_mlflow_uri
        configured = self.mlflow_uris.get(uri_key(uri))
        if configured is None:
            raise ValueError("not an MLflow URI this service logs to; leave it out for the service's own (its "
                             "operator lists others in SAN_MLFLOW_ALLOWED_URIS)")  # fmt: skip
        return configured

    def jobs_dir(self) -> Path:
        return self.storage_root / "jobs"

    def studies_dir(self) -> Path:
        """Where each finished study's tables and figures are written (and logged on its parent run)."""
        return self.storage_root / "studies"
