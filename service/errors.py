"""What the services raise when a request cannot be done, each with the HTTP status it is answered with: routes do
not translate them one by one; `create_app` registers `answer` for them all, so every one is a JSON body
``{"detail": ...}`` (and its headers: ``Retry-After`` for a 429 or a 503)."""

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse


class ServiceError(Exception):
    status = 500

    def __init__(self, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail, self.headers = detail, headers or {}


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    """An Idempotency-Key reused with another spec, or a cancel of what already ended."""

    status = 409


class Invalid(ServiceError):
    """The request's content refused after its schema passed: ``detail`` is a list in pydantic's error format."""

    status = 422


class TooMany(ServiceError):
    status = 429


class Unavailable(ServiceError):
    """A dependency (Ray, MLflow, the admission worker) did not answer: not a verdict on the request."""

    status = 503


def value_error(message: str, loc: tuple[str, ...] = ("body",)) -> Invalid:
    """A 422 located as pydantic locates a validator's ValueError."""
    return Invalid([{"loc": list(loc), "msg": f"Value error, {message}", "type": "value_error"}])


async def answer(request: Request, error: ServiceError) -> JSONResponse:
    return JSONResponse({"detail": error.detail}, status_code=error.status, headers=error.headers)
