"""``/healthz`` (the process answers; no token needed) and ``/readyz`` (database, Ray and MLflow reachable, the
admission worker started).

``/readyz`` needs no token either, and then says only ``ok`` or ``error`` per dependency: its details (the MLflow
URI, Ray's version, an error's text, which may hold an address) go only to a caller with a known token."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.auth import known_principal
from service.deps import Service

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, parts: Service) -> JSONResponse:

    def check(probe) -> dict[str, str]:
        try:
            detail = probe()
            return {"status": "ok", **({"detail": str(detail)} if detail else {})}
        except Exception as error:
            return {"status": "error", "detail": str(error).splitlines()[0] if str(error) else type(error).__name__}

    def mlflow() -> str:
        parts.runs.client(parts.settings.default_mlflow_uri).search_experiments(max_results=1)
        return parts.settings.default_mlflow_uri

    results = await asyncio.gather(
        asyncio.to_thread(check, parts.store.ping),
        asyncio.to_thread(check, parts.ray.ping),
        asyncio.to_thread(check, mlflow),
        asyncio.to_thread(check, parts.checks.ping),
    )
    checks = dict(zip(("database", "ray", "mlflow", "admission"), results, strict=True))
    if known_principal(request) is None:
        checks = {name: {"status": check["status"]} for name, check in checks.items()}
    ready = all(c["status"] == "ok" for c in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
