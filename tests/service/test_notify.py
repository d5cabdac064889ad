"""The job event registration point: listeners by name, each isolated from the others, and a
publish that never fails the job it reports on."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery

from shears.db.engine import make_engine, make_sessionmaker
from shears.db.migrate import upgrade
from tests.service.test_lifecycle import add_job
from worker import notify

EVENT = notify.JobEvent(
    id="msg_1", type="job.failed", job_id="job_1", tenant="t", timestamp="2026", data={}
)


@pytest.fixture
def registered() -> dict[str, notify.Listener]:
    saved = dict(notify._LISTENERS)
    notify._LISTENERS.clear()  # only this test's listeners, whatever other tests imported
    yield notify._LISTENERS
    notify._LISTENERS.clear()
    notify._LISTENERS.update(saved)


def test_every_listener_runs_and_one_failure_stops_no_other(registered: dict) -> None:
    seen: list[str] = []

    @notify.listener("test-broken")
    def broken(event: notify.JobEvent) -> None:
        raise RuntimeError("tracking server down")

    @notify.listener("test-ok")
    def ok(event: notify.JobEvent) -> None:
        seen.append(event.id)

    assert notify.dispatch(EVENT) == ["test-broken"]
    assert seen == ["msg_1"]
    # A retry runs only the listeners that failed.
    assert notify.dispatch(EVENT, only=["test-broken"]) == ["test-broken"]
    assert seen == ["msg_1"]


def test_a_name_is_registered_once(registered: dict) -> None:
    notify.listener("test-once")(lambda event: None)
    with pytest.raises(ValueError, match="already registered"):
        notify.listener("test-once")(lambda event: None)


def test_webhooks_are_a_registered_listener() -> None:
    import worker.webhooks  # noqa: F401  (the notify worker imports it: worker.notify_app)

    assert "webhooks" in notify.listeners()


def test_publishing_with_the_broker_down_returns_false(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    job_id = add_job(sessions, status="cancelled")
    down = Celery("shears", broker="redis://127.0.0.1:1/0")
    down.conf.update(task_publish_retry=False, broker_connection_timeout=1)
    try:
        assert notify.publish_job_event(down, sessions, job_id, "job.cancelled") is False
        assert notify.publish_job_event(down, sessions, "job_gone", "job.cancelled") is False
    finally:
        engine.dispose()


def test_compose_runs_a_notify_worker_on_the_notify_queue() -> None:
    from shears.settings import Settings
    from tests.service.test_deployment import check_entry_point, compose

    notify_service = compose()["services"]["notify"]
    command = notify_service["command"]
    check_entry_point(command)
    assert command[command.index("-A") + 1] == "worker.notify_app"
    assert command[command.index("-Q") + 1] == Settings().notify_queue
    assert "deploy" not in notify_service  # no GPU: it only waits on the network
