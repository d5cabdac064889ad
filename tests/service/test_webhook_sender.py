"""One webhook attempt (``worker.webhooks.send``) against a real receiver on loopback: signed as
Standard Webhooks verifies, the SSRF guard applied at send time to the address actually used,
no redirects, a capped response and a deadline."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import pytest

from shears.db.webhooks_repo import ClaimedAttempt, new_secret
from shears.settings import Settings
from tests.webhook_receiver import Receiver, receiver
from worker.webhooks import Outcome, send

PAYLOAD = '{"type":"job.succeeded","timestamp":"2026-12-03T08:00:00Z","data":{"id":"job_1"}}'


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


def _send(url: str, secret: str = "", *, allow_private: bool = True, timeout: float = 5) -> Outcome:
    settings = Settings(
        webhook_allow_private=allow_private,
        webhook_timeout_seconds=timeout,
        webhook_max_response_bytes=1024,
    )
    return send(ClaimedAttempt("dlv_1", 1, url, secret or new_secret(), "msg_1", PAYLOAD), settings)


def test_a_signed_post_that_standard_webhooks_verifies(hooks: Receiver) -> None:
    hooks.secrets["/ok"] = secret = new_secret()
    outcome = _send(hooks.url("/ok"), secret)
    assert outcome == Outcome(204, None)
    (got,) = hooks.at("/ok")
    assert got.verified == {
        "type": "job.succeeded",
        "timestamp": "2026-12-03T08:00:00Z",
        "data": {"id": "job_1"},
    }
    assert got.headers["webhook-id"] == "msg_1"
    assert got.headers["webhook-signature"].startswith("v1,")
    assert got.headers["content-type"] == "application/json"
    assert got.body.decode() == PAYLOAD


def test_another_secret_does_not_verify(hooks: Receiver) -> None:
    hooks.secrets["/ok"] = new_secret()
    _send(hooks.url("/ok"), new_secret())
    (got,) = hooks.at("/ok")
    assert isinstance(got.verified, Exception)


def test_loopback_is_refused_at_send_time_without_a_connection(hooks: Receiver) -> None:
    for host in ("127.0.0.1", "localhost"):
        outcome = _send(hooks.url("/ok", host), allow_private=False)
        assert outcome.status_code is None
        assert "not a public address" in (outcome.error or "")
    assert hooks.at("/ok") == []


def test_connects_to_the_address_it_checked_and_keeps_the_host_name(
    hooks: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1", "127.0.0.2"])  # a rebinding name: another answer each time

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example":
            return real(next(answers), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    outcome = _send(hooks.url("/ok", "hooks.example"))
    # Only the first answer was used: a second lookup would have gone to 127.0.0.2, where
    # nothing listens; and the receiver saw the name, not the address.
    assert outcome == Outcome(204, None)
    (got,) = hooks.at("/ok")
    assert got.headers["host"] == f"hooks.example:{hooks.port}"


def test_a_non_2xx_answer_is_a_failure_with_its_status_and_a_short_reason(
    hooks: Receiver,
) -> None:
    hooks.scripts["/boom"] = lambda _: (503, b"overloaded " * 1000)
    outcome = _send(hooks.url("/boom"))
    assert outcome.status_code == 503
    assert not outcome.ok
    assert outcome.error is not None
    assert outcome.error.startswith("HTTP 503: overloaded")
    assert len(outcome.error) < 400


def test_redirects_are_not_followed(hooks: Receiver) -> None:
    hooks.scripts["/moved"] = lambda _: (307, b"", {"location": hooks.url("/elsewhere")})
    outcome = _send(hooks.url("/moved"))
    assert outcome.status_code == 307
    assert "redirects are not followed" in (outcome.error or "")
    assert [r.path for r in hooks.requests] == ["/moved"]


def test_an_endless_response_is_read_only_up_to_the_cap(hooks: Receiver) -> None:
    def endless(_: int) -> tuple[int, Any]:
        def write(out: BinaryIO) -> None:
            try:
                while True:
                    out.write(b"x" * 4096)
            except OSError:  # the sender hung up once it had read enough
                pass

        return 200, write

    hooks.scripts["/endless"] = endless
    # With no cap this attempt would read until its deadline and count as a timeout.
    assert _send(hooks.url("/endless"), timeout=30.0) == Outcome(200, None)


def test_a_receiver_that_does_not_answer_in_time_is_a_timeout(hooks: Receiver) -> None:
    def slow(_: int) -> tuple[int, Any]:
        time.sleep(3)
        return 204, b""

    hooks.scripts["/slow"] = slow
    outcome = _send(hooks.url("/slow"), timeout=0.5)
    assert outcome.status_code is None
    assert "no response within 0.5 s" in (outcome.error or "")
