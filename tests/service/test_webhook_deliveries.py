"""The delivery log's rules, against a real (SQLite) database and a real receiver, in process:
each attempt runs once whatever the broker redelivers, failures are retried on the schedule and
then given up, and the sweeper resends an attempt whose message was lost. The queue itself is the
e2e tier's (tests/e2e/test_webhooks.py); here the next attempt is only recorded."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from shears.db import webhooks_repo
from shears.db.engine import make_engine, make_sessionmaker
from shears.db.migrate import upgrade
from shears.db.tables import WebhookDelivery, new_id, utcnow
from shears.settings import get_settings
from tests.webhook_receiver import Receiver, fail_then_accept, receiver
from worker import webhooks

RETRY_AFTER = 30.0


@pytest.fixture
def sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    monkeypatch.setenv("SHEARS_DATABASE_URL", url)
    monkeypatch.setenv("SHEARS_WEBHOOK_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("SHEARS_WEBHOOK_RETRY_SCHEDULE", str(RETRY_AFTER))  # two attempts
    get_settings.cache_clear()
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    monkeypatch.setattr(webhooks, "sessions", lambda: factory)
    yield factory
    engine.dispose()
    get_settings.cache_clear()


@pytest.fixture
def scheduled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, float]]:
    calls: list[tuple[str, int, float]] = []
    monkeypatch.setattr(
        webhooks,
        "schedule_attempt",
        lambda _, *args: calls.append(args),  # type: ignore[arg-type]
    )
    return calls


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


def delivery_to(sessions: sessionmaker[Session], hooks: Receiver, path: str) -> str:
    tenant = path.strip("/")  # a tenant per endpoint: each delivery goes to one
    with sessions.begin() as session:
        endpoint = webhooks_repo.add_endpoint(
            session, tenant, hooks.url(path), ["job.failed"], None
        )
        hooks.secrets[path] = endpoint.secret
        session.flush()
        (delivery_id,) = webhooks_repo.add_deliveries(
            session, tenant, "job.failed", new_id("msg"), "job_1", '{"type":"job.failed"}'
        )
    return delivery_id


def row(sessions: sessionmaker[Session], delivery_id: str) -> Any:
    with sessions() as session:
        return session.get(WebhookDelivery, delivery_id)


def test_each_attempt_runs_once_and_a_failure_is_retried_on_schedule(
    sessions: sessionmaker[Session], hooks: Receiver, scheduled: list
) -> None:
    hooks.scripts["/flaky"] = fail_then_accept(1)
    delivery_id = delivery_to(sessions, hooks, "/flaky")

    webhooks.deliver(delivery_id, 1)
    webhooks.deliver(delivery_id, 1)  # the broker delivered the message twice
    assert len(hooks.at("/flaky")) == 1
    first = row(sessions, delivery_id)
    assert (first.status, first.attempts, first.last_status_code) == ("pending", 1, 500)
    ((again, attempt, delay),) = scheduled
    assert (again, attempt) == (delivery_id, 2)
    assert RETRY_AFTER * 0.8 <= delay <= RETRY_AFTER * 1.2
    due_in = (first.next_attempt_at - utcnow()).total_seconds()
    assert RETRY_AFTER * 0.8 - 5 <= due_in <= RETRY_AFTER * 1.2

    webhooks.deliver(delivery_id, 2)
    webhooks.deliver(delivery_id, 2)
    assert len(hooks.at("/flaky")) == 2
    done = row(sessions, delivery_id)
    assert (done.status, done.attempts, done.last_status_code) == ("succeeded", 2, 204)
    assert (done.next_attempt_at, done.last_error) == (None, None)
    assert len(scheduled) == 1
    assert all(isinstance(r.verified, dict) for r in hooks.at("/flaky"))


def test_when_the_last_attempt_fails_the_delivery_gives_up(
    sessions: sessionmaker[Session], hooks: Receiver, scheduled: list
) -> None:
    hooks.scripts["/down"] = lambda _: (502, b"bad gateway")
    delivery_id = delivery_to(sessions, hooks, "/down")
    webhooks.deliver(delivery_id, 1)
    webhooks.deliver(delivery_id, 2)
    given_up = row(sessions, delivery_id)
    assert (given_up.status, given_up.attempts, given_up.last_status_code) == ("failed", 2, 502)
    assert given_up.next_attempt_at is None
    assert given_up.last_error == "HTTP 502: bad gateway"
    assert [attempt for _, attempt, _ in scheduled] == [2]


def test_the_sweeper_resends_only_attempts_overdue_past_the_grace(
    sessions: sessionmaker[Session], hooks: Receiver, scheduled: list
) -> None:
    lost, on_time = delivery_to(sessions, hooks, "/a"), delivery_to(sessions, hooks, "/b")
    with sessions.begin() as session:
        session.get(WebhookDelivery, lost).next_attempt_at = utcnow() - timedelta(minutes=5)
    assert webhooks.republish_overdue(None) == 1  # type: ignore[arg-type]
    assert scheduled == [(lost, 1, 0.0)]
    assert row(sessions, on_time).next_attempt_at is not None


def test_a_deleted_endpoint_gets_nothing(
    sessions: sessionmaker[Session], hooks: Receiver, scheduled: list
) -> None:
    delivery_id = delivery_to(sessions, hooks, "/gone")
    with sessions.begin() as session:
        endpoint_id = session.get(WebhookDelivery, delivery_id).endpoint_id
        webhooks_repo.delete_endpoint(session, endpoint_id)
    webhooks.deliver(delivery_id, 1)
    assert hooks.at("/gone") == []
    assert row(sessions, delivery_id) is None
