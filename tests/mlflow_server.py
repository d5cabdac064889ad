"""A real MLflow tracking server (``mlflow server``) on loopback, with a SQLite backend and local
artifacts in a directory of its own: stop it and start it again on the same port to play a
tracking server that goes down and comes back with its data."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from examples.processes import ROOT


@dataclass
class MlflowServer:
    root: Path
    port: int
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process; :meth:`wait_ready` waits for it (start-up takes tens of seconds)."""
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SHEARS_", "MLFLOW_"))}
        # The server's background job runner (huey consumers, for GenAI features) is not needed
        # to track runs; without it start-up is quicker and leaves no extra processes behind.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode}:\n{self.log()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""
