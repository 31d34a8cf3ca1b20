"""Webhooks: a principal's jobs' state changes (after ``queued``) and its studies' ends — a finished study with its
table — POSTed to the URLs it registered. Each transition is written to an outbox in the same transaction as the
transition itself (`service.store.enqueue`), so a restart loses none; `Deliverer` sends each webhook's events in
order, one at a time per webhook (a slow or failing receiver holds up only itself), retrying with exponential
backoff; a delivery never acknowledged is sent again after a restart (``X-San-Delivery`` lets a receiver drop a
repeat). The body is signed: ``X-San-Signature: sha256=<HMAC-SHA256 of the body with the webhook's secret>``.

Only to hosts the operator allows (``SAN_WEBHOOK_ALLOWED_HOSTS``, a JSON list of ``host`` or ``host:port``; empty:
no webhooks): a principal cannot make the service call into the cluster (SSRF). Redirects are not followed."""

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx

from service.store import Delivery, WebhookStore

log = logging.getLogger("san.service")
MAX_ATTEMPTS = 12  # then the delivery is abandoned (its error kept) and the webhook's next event goes
MAX_BACKOFF_S = 600.0
TIMEOUT_S = 10.0
MAX_PER_PRINCIPAL = 10


def check_url(url: str, allowed_hosts: list[str]) -> str:
    """``url`` if it is http(s) to a host the operator allows; ValueError saying why not."""
    if not allowed_hosts:
        raise ValueError("this service sends no webhooks: its operator allows no host (SAN_WEBHOOK_ALLOWED_HOSTS)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"not a URL: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a webhook is an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("a webhook URL carries no credentials: verify the signature instead")
    host = parts.hostname.lower()
    port = port or (443 if parts.scheme == "https" else 80)
    allowed = {entry.lower() for entry in allowed_hosts}
    if host not in allowed and f"{host}:{port}" not in allowed:
        raise ValueError(
            f"host {host}:{port} is not one this service may call (its operator lists them in "
            "SAN_WEBHOOK_ALLOWED_HOSTS)"
        )
    return url


def new_secret() -> str:
    return secrets.token_hex(32)


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff(attempts: int) -> float:
    return min(2.0 ** (attempts - 1), MAX_BACKOFF_S)


class Deliverer:
    def __init__(self, hooks: WebhookStore, allowed_hosts: list[str], concurrency: int = 8) -> None:
        self.hooks, self.allowed_hosts = hooks, allowed_hosts
        self.sending: set[str] = set()  # webhook ids with a delivery in flight
        self.slots = asyncio.Semaphore(concurrency)
        self.tasks: set[asyncio.Task] = set()

    async def run(self, interval_s: float) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False) as client:
            try:
                while True:
                    await self.pass_once(client)
                    await asyncio.sleep(interval_s)
            finally:
                for task in self.tasks:
                    task.cancel()

    async def pass_once(self, client: httpx.AsyncClient) -> None:
        try:
            due = await asyncio.to_thread(self.hooks.due, datetime.now(UTC))
        except Exception as error:  # the store away: the next pass
            log.warning("webhooks: %s", error)
            return
        for delivery in due:
            if delivery.webhook_id in self.sending:
                continue
            self.sending.add(delivery.webhook_id)
            task = asyncio.create_task(self.send(client, delivery))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def send(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        try:
            async with self.slots:
                error = await self.post(client, delivery)
            if error is None:
                await asyncio.to_thread(self.hooks.delivered, delivery.seq)
                return
            attempts = delivery.attempts + 1
            retry = datetime.now(UTC) + timedelta(seconds=backoff(attempts)) if attempts < MAX_ATTEMPTS else None
            await asyncio.to_thread(self.hooks.failed, delivery.seq, attempts, retry, error)
        except Exception as error:  # the store away: the delivery stays due
            log.warning("webhook delivery %d: %s", delivery.seq, error)
        finally:
            self.sending.discard(delivery.webhook_id)

    async def post(self, client: httpx.AsyncClient, delivery: Delivery) -> str | None:
        """None when the receiver acknowledged it (2xx), else why not."""
        try:
            check_url(delivery.url, self.allowed_hosts)  # the operator may have narrowed the list since
        except ValueError as error:
            return str(error)
        body = json.dumps(delivery.payload, separators=(",", ":"), default=str).encode()
        headers = {
            "Content-Type": "application/json",
            "X-San-Signature": signature(delivery.secret, body),
            "X-San-Event": f"{delivery.payload.get('kind')}.{delivery.payload.get('status')}",
            "X-San-Delivery": str(delivery.seq),
            "User-Agent": "san-webhooks",
        }
        try:
            response = await client.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as error:
            return f"{type(error).__name__}: {error}"
        return None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
