"""``/v1/webhooks``: endpoints that receive signed job events, and their delivery logs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from api.deps import SessionDep, SettingsDep, TenantDep
from api.services import webhooks
from api.webhook_schemas import (
    DeliveryList,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookOut,
)
from shears.db.tables import WebhookEndpoint

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

Limit = Annotated[int, Query(ge=1, le=200)]


@router.post("", status_code=201, response_model=WebhookCreated, responses={422: {}})
def create_webhook(
    body: WebhookCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> WebhookEndpoint:
    """Register an endpoint. The response carries its signing secret, shown this once."""
    endpoint = webhooks.create(session, tenant, body, allow_private=settings.webhook_allow_private)
    session.commit()
    return endpoint


@router.get("", response_model=WebhookList)
def list_webhooks(
    session: SessionDep, tenant: TenantDep, limit: Limit = 50, cursor: str | None = None
) -> dict[str, Any]:
    items, next_cursor = webhooks.list_endpoints(session, tenant, limit, cursor)
    return {"items": items, "next_cursor": next_cursor}


@router.get("/{webhook_id}", response_model=WebhookOut, responses={404: {}})
def get_webhook(webhook_id: str, session: SessionDep, tenant: TenantDep) -> WebhookEndpoint:
    return webhooks.get(session, tenant, webhook_id)


@router.delete("/{webhook_id}", status_code=204, responses={404: {}})
def delete_webhook(webhook_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    """Remove the endpoint and its delivery log; pending retries stop."""
    webhooks.delete(session, tenant, webhook_id)
    session.commit()
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList, responses={404: {}})
def list_deliveries(
    webhook_id: str,
    session: SessionDep,
    tenant: TenantDep,
    limit: Limit = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Every event sent (or being sent) to the endpoint, newest first."""
    items, next_cursor = webhooks.deliveries(session, tenant, webhook_id, limit, cursor)
    return {"items": items, "next_cursor": next_cursor}
