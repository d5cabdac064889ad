"""A real webhook receiver for tests: an HTTP server on loopback, in a thread, that verifies each
request's Standard Webhooks signature and answers per path as the test scripts it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: Any  # the parsed JSON when the signature checked out, else the error


# What a path answers: (status, body[, headers]), the body possibly a function that writes it
# itself; called with the number of earlier requests to that path.
Reply = bytes | Callable[[BinaryIO], None]
Script = Callable[[int], tuple[int, Reply] | tuple[int, Reply, dict[str, str]]]


@dataclass
class Receiver:
    port: int
    secrets: dict[str, str] = field(default_factory=dict)  # path -> whsec_ secret
    scripts: dict[str, Script] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.at(path)
            if len(got) >= count:
                return got
            time.sleep(0.1)
        raise AssertionError(f"{path}: {len(self.at(path))} requests, expected {count}")


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            verified: Any
            try:
                verified = Webhook(receiver.secrets[self.path]).verify(body, headers)
            except (KeyError, WebhookVerificationError) as exc:
                verified = exc
            with receiver.lock:
                seen = sum(1 for r in receiver.requests if r.path == self.path)
                receiver.requests.append(Received(self.path, headers, body, verified))
            script = receiver.scripts.get(self.path, lambda _: (204, b""))
            status, reply, *extra = script(seen)
            self.send_response(status)
            for name, value in (extra[0] if extra else {}).items():
                self.send_header(name, value)
            if callable(reply):  # no length: the body lasts as long as the writer wants
                self.send_header("connection", "close")
                self.end_headers()
                reply(self.wfile)
                return
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def receiver() -> Iterator[Receiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Receiver(port=0)))
    state = Receiver(port=server.server_address[1])
    server.RequestHandlerClass = _handler(state)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def fail_then_accept(failures: int) -> Script:
    """500 for the first ``failures`` requests, then 204."""
    return lambda seen: (500, b"not yet") if seen < failures else (204, b"")
