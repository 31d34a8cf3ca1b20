"""``/v1/models``, ``/v1/attention``, ``/v1/datasets``: what a JobSpec may name, from the registries and the
catalog (names only: the service never builds a model)."""

from dataclasses import asdict

from fastapi import APIRouter, Depends

from san.registry import list_attention, list_models, list_placements
from service.auth import principal
from service.deps import Settings
from training.data.catalog import CATALOG, EMBEDDED

router = APIRouter(prefix="/v1", tags=["catalog"], dependencies=[Depends(principal)])


@router.get("/models")
def models() -> dict[str, list[str]]:
    return {"models": list_models(), "placements": list_placements()}


@router.get("/attention")
def attention() -> dict[str, list[str]]:
    return {"attention": list_attention(), "placements": list_placements()}


@router.get("/datasets")
def datasets(settings: Settings) -> dict[str, list[dict]]:
    """Each catalog dataset, whether it is embedded (built on first use) and whether it is built under the data
    root now."""
    root = settings.data_root
    rows = []
    for name, info in CATALOG.items():
        row = {key: value for key, value in asdict(info).items() if key != "embedded_source"}
        row.update(embedded=name in EMBEDDED, built=(root / name / "train.beton").is_file())
        rows.append(row)
    return {"datasets": rows}
