"""Webhooks: register, read, list and delete endpoints; read their delivery log.

Nothing here sends anything: deliveries leave from the notify worker (``worker.webhooks``).
Nothing here commits: the route does.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.services.errors import InvalidField, NotFound
from api.webhook_schemas import WebhookCreate
from shears import ssrf
from shears.db import webhooks_repo as repo
from shears.db.tables import WebhookDelivery, WebhookEndpoint


def create(
    session: Session, tenant: str, body: WebhookCreate, *, allow_private: bool
) -> WebhookEndpoint:
    """Add an endpoint with a new secret. Raises InvalidField for a URL that is not http(s), does
    not resolve, or resolves to a non-public address (unless ``allow_private``)."""
    try:
        ssrf.check(body.url, allow_private=allow_private)
    except ssrf.UnsafeURL as exc:
        raise InvalidField(("url",), f"url: {exc}") from exc
    endpoint = repo.add_endpoint(session, tenant, body.url, list(body.events), body.description)
    session.flush()
    return endpoint


def get(session: Session, tenant: str, endpoint_id: str) -> WebhookEndpoint:
    """The tenant's endpoint (NotFound for another tenant's id, as for an unknown one)."""
    endpoint = repo.get_endpoint(session, tenant, endpoint_id)
    if endpoint is None:
        raise NotFound("webhook", endpoint_id)
    return endpoint


def list_endpoints(
    session: Session, tenant: str, limit: int, cursor: str | None
) -> tuple[list[WebhookEndpoint], str | None]:
    return repo.list_endpoints(session, tenant, limit, cursor)


def delete(session: Session, tenant: str, endpoint_id: str) -> None:
    repo.delete_endpoint(session, get(session, tenant, endpoint_id).id)


def deliveries(
    session: Session, tenant: str, endpoint_id: str, limit: int, cursor: str | None
) -> tuple[list[WebhookDelivery], str | None]:
    """Newest first."""
    return repo.list_deliveries(session, get(session, tenant, endpoint_id).id, limit, cursor)
