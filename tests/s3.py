"""A moto S3 server process on loopback for the tests (one per session)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from examples.s3server import S3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto")).start()
    try:
        yield server
    finally:
        server.stop()
