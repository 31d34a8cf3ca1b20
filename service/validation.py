"""Checks a valid `JobSpec` must also pass to be admitted here: the service's limits, the cluster's size, and
data inside the data root. Each failure names its field, as pydantic's own errors do."""

import asyncio

from service.ray_jobs import RayJobs, RayUnavailable
from service.settings import ServiceSettings
from training.config import JobSpec
from training.data.resolve import resolve_data


class Rejected(ValueError):
    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc, self.message = loc, message

    def detail(self) -> list[dict]:
        return [{"loc": ["body", *self.loc], "msg": self.message, "type": "value_error"}]


class ClusterSize:
    """The cluster's CPUs and GPUs as last asked of Ray (None while unknown or Ray is down). `refresh` runs in
    the background (`run`), so admitting a job never waits on Ray."""

    def __init__(self, ray: RayJobs) -> None:
        self.ray = ray
        self.value: dict[str, float] | None = None

    def refresh(self) -> None:
        try:
            size = self.ray.resources()
        except RayUnavailable:
            size = None
        # A head that has just started lists no live node's CPUs yet: that is "unknown", not "no room".
        self.value = size if size and size["CPU"] > 0 else None

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(interval_s if self.value is not None else min(interval_s, 1.0))


def admit(spec: JobSpec, settings: ServiceSettings, cluster: ClusterSize) -> JobSpec:
    """``spec`` as the job will run it — with the MLflow URI it will log to, the service's when the spec names
    none, else one its operator allowed — or `Rejected`."""
    try:
        uri = settings.configured_mlflow_uri(spec.tracking.mlflow_uri)
    except ValueError as error:
        raise Rejected(("tracking", "mlflow_uri"), f"tracking.mlflow_uri: {error}") from None
    limits = (
        (("training", "epochs"), spec.training.epochs, settings.max_epochs),
        (("training", "batch_size"), spec.training.batch_size, settings.max_batch_size),
        (("scaling", "num_workers"), spec.scaling.num_workers, settings.max_workers),
    )
    for loc, value, limit in limits:
        if value > limit:
            raise Rejected(loc, f"{'.'.join(loc)} {value} is above this service's limit of {limit}")
    params = spec.model_params()  # counted on the meta device when the spec was validated (cached)
    if params > settings.max_model_params:
        raise Rejected(("model",), f"model: {params:,} parameters is above this service's limit of "
                       f"{settings.max_model_params:,}")  # fmt: skip
    size = cluster.value
    if size is not None:
        cpus = spec.scaling.num_workers * spec.scaling.cpus_per_worker
        if cpus > size["CPU"]:
            raise Rejected(("scaling", "num_workers"), f"{spec.scaling.num_workers} workers × "
                           f"{spec.scaling.cpus_per_worker} CPUs = {cpus} CPUs, but the cluster has "
                           f"{size['CPU']:g}")  # fmt: skip
        if spec.scaling.use_gpu and spec.scaling.num_workers > size["GPU"]:
            raise Rejected(("scaling", "num_workers"), f"{spec.scaling.num_workers} GPU workers, but the cluster "
                           f"has {size['GPU']:g} GPUs")  # fmt: skip
    try:
        resolve_data(spec, settings.data_root, build_missing=False)
    except ValueError as error:
        field = str(error).partition(": ")[0]
        loc = tuple(field.split(".")) if field.startswith(("data.", "training.")) else ("data",)
        raise Rejected(loc, str(error)) from None
    return spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"mlflow_uri": uri})})
