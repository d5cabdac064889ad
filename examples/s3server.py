"""A real S3-compatible server on loopback (moto's ``moto_server``), for the tests and benchmarks
that run Shears on object storage without a cloud account."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from examples.processes import free_port

# moto accepts any credentials; boto3 still wants some, and a region for signing.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "shears-test",
    "AWS_SECRET_ACCESS_KEY": "shears-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    """``moto_server`` as a process on a free port; ``stop()`` ends it."""

    log_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, bucket: str, prefix: str = "shears") -> dict[str, str]:
        """The settings that put a Shears process on this server's ``bucket``."""
        return {
            **CREDENTIALS,
            "SHEARS_STORAGE_URL": f"s3://{bucket}/{prefix}",
            "SHEARS_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def start(self) -> S3Server:
        log = (self.log_dir / "moto.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.endpoint_url + "/moto-api/", timeout=1)
                return self
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def new_bucket(self) -> str:
        name = f"shears-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
