"""Every query about webhooks: endpoints, and the delivery log. Callers own the transaction.

A delivery is claimed for one attempt at a time with a conditional update on its attempt count,
like a job: a duplicate or late message for an attempt that already ran does nothing, and a
result is recorded only by the attempt that claimed it.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shears.db.repository import _page
from shears.db.tables import WebhookDelivery, WebhookEndpoint, new_id, utcnow

SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 24 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


# --- endpoints ----------------------------------------------------------------------------------


def add_endpoint(
    session: Session, tenant: str, url: str, events: list[str], description: str | None
) -> WebhookEndpoint:
    endpoint = WebhookEndpoint(
        id=new_id("whk"),
        tenant=tenant,
        url=url,
        events=events,
        description=description,
        secret=new_secret(),
        created_at=utcnow(),
    )
    session.add(endpoint)
    return endpoint


def get_endpoint(session: Session, tenant: str, endpoint_id: str) -> WebhookEndpoint | None:
    return session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant == tenant
        )
    )


def list_endpoints(
    session: Session, tenant: str, limit: int, cursor: str | None
) -> tuple[list[WebhookEndpoint], str | None]:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.tenant == tenant)
    return _page(session, WebhookEndpoint, stmt, limit, cursor)


def delete_endpoint(session: Session, endpoint_id: str) -> None:
    """The endpoint and its delivery log; a pending retry then finds nothing and stops."""
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id))
    session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id))


# --- deliveries ---------------------------------------------------------------------------------


def list_deliveries(
    session: Session, endpoint_id: str, limit: int, cursor: str | None
) -> tuple[list[WebhookDelivery], str | None]:
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    return _page(session, WebhookDelivery, stmt, limit, cursor)


def add_deliveries(
    session: Session, tenant: str, event: str, message_id: str, job_id: str, payload: str
) -> list[str]:
    """A pending delivery of ``message_id`` to each of the tenant's endpoints subscribed to
    ``event`` that does not have one yet; returns the new deliveries' ids."""
    endpoints = session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant == tenant))
    # Subscriptions are a JSON list, which SQLite and PostgreSQL query differently; a tenant has
    # few endpoints, so they are read and filtered here.
    subscribed = [e.id for e in endpoints if event in e.events]
    if not subscribed:
        return []
    done = set(
        session.scalars(
            select(WebhookDelivery.endpoint_id).where(
                WebhookDelivery.message_id == message_id,
                WebhookDelivery.endpoint_id.in_(subscribed),
            )
        )
    )
    now = utcnow()
    created = []
    for endpoint_id in subscribed:
        if endpoint_id in done:
            continue
        delivery = WebhookDelivery(
            id=new_id("dlv"),
            endpoint_id=endpoint_id,
            message_id=message_id,
            event=event,
            job_id=job_id,
            payload=payload,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        try:
            with session.begin_nested():  # a concurrent copy of this event won: skip it
                session.add(delivery)
        except IntegrityError:
            continue
        created.append(delivery.id)
    return created


@dataclass(frozen=True)
class ClaimedAttempt:
    """What one attempt needs: the endpoint's URL and secret, the message and its body."""

    delivery_id: str
    attempt: int
    url: str
    secret: str
    message_id: str
    payload: str


def claim_attempt(
    session: Session, delivery_id: str, attempt: int, lost_after: datetime
) -> ClaimedAttempt | None:
    """Take attempt number ``attempt`` of a pending delivery; None if that attempt already ran,
    the delivery is finished, or it (or its endpoint) is gone. Until ``lost_after`` the attempt
    is in flight; past it, with no result recorded, the sweeper sends the next one."""
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.attempts == attempt - 1,
        )
        .values(attempts=attempt, next_attempt_at=lost_after)
        .execution_options(synchronize_session=False)
    )
    if cast(CursorResult[Any], result).rowcount != 1:
        return None
    row = session.execute(
        select(
            WebhookEndpoint.url,
            WebhookEndpoint.secret,
            WebhookDelivery.message_id,
            WebhookDelivery.payload,
        )
        .select_from(WebhookDelivery)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id == delivery_id)
    ).first()
    if row is None:
        return None
    return ClaimedAttempt(delivery_id, attempt, row.url, row.secret, row.message_id, row.payload)


def record_attempt(
    session: Session,
    delivery_id: str,
    attempt: int,
    *,
    status: str,
    status_code: int | None,
    error: str | None,
    next_attempt_at: datetime | None,
) -> bool:
    """Record how attempt ``attempt`` went; False if a later attempt has started meanwhile."""
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempt)
        .values(
            status=status,
            last_status_code=status_code,
            last_error=error,
            next_attempt_at=next_attempt_at,
        )
    )
    return cast(CursorResult[Any], result).rowcount == 1


def overdue_deliveries(
    session: Session, due_before: datetime, limit: int = 100
) -> list[tuple[str, int]]:
    """``(id, attempts)`` of pending deliveries whose next attempt should have started by
    ``due_before``: its message was lost, or the worker died during an attempt."""
    stmt = (
        select(WebhookDelivery.id, WebhookDelivery.attempts)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at < due_before)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    return [(row.id, row.attempts) for row in session.execute(stmt)]
