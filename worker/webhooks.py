"""Webhook deliveries (Standard Webhooks), on the notify worker.

A job event becomes one logged delivery per subscribed endpoint (the ``webhooks`` listener); each
attempt is a ``shears.notify.deliver_webhook`` task that POSTs the same body under the same
``webhook-id``, signed afresh (``webhook-timestamp``, ``webhook-signature``). A non-2xx answer, a
timeout or a refused target is retried after ``SHEARS_WEBHOOK_RETRY_SCHEDULE`` (with jitter); the
database row is the truth, and the sweeper republishes an attempt whose message was lost.

Every attempt checks the target again (``shears.ssrf``) and connects to the very address it
checked, keeping the host name for ``Host`` and TLS (SNI and the certificate check); redirects are
not followed, and the whole attempt, DNS included, has one deadline.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.to_thread
import httpx
import structlog
from celery import Celery, current_app, shared_task
from standardwebhooks import Webhook

from shears import ssrf
from shears.db import webhooks_repo as repo
from shears.db.tables import utcnow
from shears.settings import Settings, get_settings
from worker.db import sessions
from worker.notify import JobEvent, listener

log = structlog.get_logger("shears.webhooks")

DELIVER_TASK = "shears.notify.deliver_webhook"
USER_AGENT = "Shears-Webhooks/1"
# An attempt that has recorded nothing this long after its deadline is taken as lost.
_LOST_GRACE = timedelta(seconds=60)
_JITTER = 0.2  # each retry delay is scaled by a random factor in [1 - _JITTER, 1 + _JITTER]
_ERROR_SNIPPET = 300  # characters of a failed response kept in the log


@listener("webhooks")
def on_job_event(event: JobEvent) -> None:
    """Log a delivery of ``event`` for each endpoint of its tenant that subscribed to it, then
    send the first attempts."""
    body = json.dumps(
        {"type": event.type, "timestamp": event.timestamp, "data": event.data},
        separators=(",", ":"),
    )
    with sessions().begin() as session:
        created = repo.add_deliveries(
            session, event.tenant, event.type, event.id, event.job_id, body
        )
    for delivery_id in created:
        schedule_attempt(current_app, delivery_id, 1, 0.0)


def schedule_attempt(celery: Celery, delivery_id: str, attempt: int, delay: float) -> None:
    celery.send_task(DELIVER_TASK, args=[delivery_id, attempt], countdown=delay or None)


def retry_delay(settings: Settings, attempt: int) -> float | None:
    """Seconds before the attempt after ``attempt`` (1-based), jittered; None when none is left."""
    schedule = settings.webhook_retry_schedule
    if attempt > len(schedule):
        return None
    jitter = random.SystemRandom().uniform(1 - _JITTER, 1 + _JITTER)
    return schedule[attempt - 1] * jitter


@dataclass(frozen=True)
class Outcome:
    """How one attempt went: the response's status (None without one) and, unless 2xx, why."""

    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@shared_task(name=DELIVER_TASK)  # type: ignore[untyped-decorator]
def deliver(delivery_id: str, attempt: int) -> None:
    """Send attempt ``attempt`` of a delivery and record it; schedule the next one if it failed."""
    settings = get_settings()
    lost_after = utcnow() + timedelta(seconds=settings.webhook_timeout_seconds) + _LOST_GRACE
    with sessions().begin() as session:
        claimed = repo.claim_attempt(session, delivery_id, attempt, lost_after)
    if claimed is None:
        return  # already sent, finished, or deleted with its endpoint
    if attempt > len(settings.webhook_retry_schedule) + 1:
        # Only the sweeper asks for one more after a lost last attempt: the budget is spent.
        outcome = Outcome(None, "no attempt left (the last one was lost)")
    else:
        outcome = send(claimed, settings)
    delay = None if outcome.ok else retry_delay(settings, attempt)
    status = "succeeded" if outcome.ok else ("pending" if delay is not None else "failed")
    next_at: datetime | None = None if delay is None else utcnow() + timedelta(seconds=delay)
    with sessions().begin() as session:
        ours = repo.record_attempt(
            session,
            delivery_id,
            attempt,
            status=status,
            status_code=outcome.status_code,
            error=outcome.error,
            next_attempt_at=next_at,
        )
    log.info(
        "webhook attempt",
        delivery_id=delivery_id,
        attempt=attempt,
        status=status,
        status_code=outcome.status_code,
        error=outcome.error,
    )
    if ours and delay is not None:
        schedule_attempt(current_app, delivery_id, attempt + 1, delay)


def sign(secret: str, message_id: str, payload: str, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, at, payload),
    }


def send(attempt: repo.ClaimedAttempt, settings: Settings) -> Outcome:
    """POST the attempt's payload to its URL once, signed; never raises."""
    timeout = settings.webhook_timeout_seconds
    try:
        return anyio.run(_send, attempt, settings)
    except TimeoutError:
        return Outcome(None, f"no response within {timeout:g} s")
    except ssrf.UnsafeURL as exc:
        return Outcome(None, f"target refused: {exc}")
    except httpx.HTTPError as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # an attempt that fails oddly is still an attempt, and is retried
        log.exception("webhook attempt crashed")
        return Outcome(None, f"{type(exc).__name__}: {exc}")


async def _send(attempt: repo.ClaimedAttempt, settings: Settings) -> Outcome:
    timeout = settings.webhook_timeout_seconds
    with anyio.fail_after(timeout):
        target = await anyio.to_thread.run_sync(
            lambda: ssrf.check(attempt.url, allow_private=settings.webhook_allow_private),
            abandon_on_cancel=True,
        )
        headers = {
            **sign(attempt.secret, attempt.message_id, attempt.payload, utcnow()),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        async with httpx.AsyncClient(
            follow_redirects=False, trust_env=False, timeout=timeout
        ) as client:
            request = _pinned(client, target, attempt.payload, headers)
            response = await client.send(request, stream=True)
            try:
                body = await _read_capped(response, settings.webhook_max_response_bytes)
            finally:
                await response.aclose()
    if 200 <= response.status_code < 300:
        return Outcome(response.status_code, None)
    text = body.decode("utf-8", errors="replace")[:_ERROR_SNIPPET]
    reason = f"HTTP {response.status_code}"
    if response.is_redirect:
        reason += " (redirects are not followed)"
    return Outcome(response.status_code, f"{reason}: {text}" if text else reason)


def _pinned(
    client: httpx.AsyncClient, target: ssrf.Target, payload: str, headers: dict[str, str]
) -> httpx.Request:
    """The request, addressed to the checked IP; ``Host`` and TLS keep the URL's host name."""
    url = httpx.URL(target.url)
    host_header = url.netloc.decode("ascii")
    extensions: dict[str, Any] = {}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.host
    return client.build_request(
        "POST",
        url.copy_with(host=str(target.address)),
        content=payload.encode(),
        headers={**headers, "host": host_header},
        extensions=extensions,
    )


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the body: the rest is never read."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk[: limit - size])
        size += len(chunks[-1])
        if size >= limit:
            break
    return b"".join(chunks)


def republish_overdue(celery: Celery) -> int:
    """Send again the attempts the sweeper finds overdue (lost message, dead worker); returns how
    many. A duplicate is harmless: the attempt's claim refuses it."""
    with sessions()() as session:
        overdue = repo.overdue_deliveries(session, utcnow() - _LOST_GRACE)
    for delivery_id, attempts in overdue:
        schedule_attempt(celery, delivery_id, attempts + 1, 0.0)
    if overdue:
        log.info("republished overdue webhook attempts", count=len(overdue))
    return len(overdue)
