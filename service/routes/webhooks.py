"""``/v1/webhooks``: where a principal's job and study transitions are POSTed (`service.webhooks`)."""

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from service.auth import Principal
from service.deps import Service
from service.errors import NotFound, TooMany, value_error
from service.schemas import WebhookCreated, WebhookRequest, WebhookView
from service.webhooks import MAX_PER_PRINCIPAL, check_url, new_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", status_code=201, response_model=WebhookCreated)
async def add_webhook(request: WebhookRequest, principal: Principal, service: Service) -> WebhookCreated:
    """Register a URL (http/https, on a host the operator allows: else 422) for this principal's job and study
    transitions. The answer holds the secret that signs every delivery, once."""
    try:
        url = check_url(request.url, service.settings.webhook_allowed_hosts)
    except ValueError as error:
        raise value_error(str(error), ("body", "url")) from None
    if await run_in_threadpool(service.webhooks.count, principal) >= MAX_PER_PRINCIPAL:
        raise TooMany(f"a principal has at most {MAX_PER_PRINCIPAL} webhooks: delete one first")
    secret = new_secret()
    hook = await run_in_threadpool(service.webhooks.create, principal, url, secret)
    return WebhookCreated(id=hook.id, url=hook.url, created_at=hook.created_at, secret=secret)


@router.get("", response_model=list[WebhookView])
async def list_webhooks(principal: Principal, service: Service) -> list[WebhookView]:
    """This principal's webhooks (without their secrets)."""
    hooks = await run_in_threadpool(service.webhooks.of, principal)
    return [WebhookView(id=hook.id, url=hook.url, created_at=hook.created_at) for hook in hooks]


@router.delete("/{webhook_id}", status_code=204)
async def delete_webhook(webhook_id: str, principal: Principal, service: Service) -> Response:
    """The webhook and the deliveries it has not received yet."""
    if not await run_in_threadpool(service.webhooks.delete, webhook_id, principal):
        raise NotFound(f"no webhook {webhook_id!r}")
    return Response(status_code=204)
