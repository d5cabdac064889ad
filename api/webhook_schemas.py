"""Request and response bodies of ``/v1/webhooks`` (Standard Webhooks)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.notify import JOB_EVENTS, JobEventType


class WebhookCreate(BaseModel):
    """``POST /v1/webhooks``: where to send which job events."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="An http(s) URL on a publicly reachable host; it receives a signed POST "
        "per event (Standard Webhooks).",
    )
    events: list[JobEventType] = Field(
        min_length=1, max_length=len(JOB_EVENTS), description="The job events to send."
    )
    description: str | None = Field(default=None, max_length=255)

    @field_validator("events")
    @classmethod
    def _unique(cls, events: list[JobEventType]) -> list[JobEventType]:
        return list(dict.fromkeys(events))


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class WebhookOut(_Out):
    id: str
    url: str
    events: list[str]
    description: str | None
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="The signing secret (whsec_…), shown only in this response: verify each "
        "delivery's webhook-signature with it, e.g. standardwebhooks.Webhook(secret).verify()."
    )


class WebhookList(_Out):
    items: list[WebhookOut]
    next_cursor: str | None


class DeliveryOut(_Out):
    id: str
    event: str
    status: Literal["pending", "succeeded", "failed"] = Field(
        description="pending: an attempt is due or in flight; failed: every attempt failed."
    )
    attempts: int
    last_status_code: int | None = Field(description="The last response's HTTP status.")
    next_attempt_at: datetime | None
    job_id: str | None
    message_id: str = Field(description="The webhook-id header, the same on every attempt.")
    last_error: str | None = Field(description="Why the last attempt failed, if it did.")
    created_at: datetime


class DeliveryList(_Out):
    items: list[DeliveryOut]
    next_cursor: str | None
