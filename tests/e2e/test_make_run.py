"""`make run`'s command: migrations, API, worker, notify worker and sweeper on the embedded
default; Ctrl-C stops everything it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.service import ROOT

pytestmark = pytest.mark.e2e


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_serve_starts_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEARS_")}
    env.update(SHEARS_DATA_DIR=str(tmp_path / "data"), SHEARS_PORT=str(port), PYTHONUNBUFFERED="1")
    log = (tmp_path / "serve.log").open("wb")
    # Its own session, like a terminal's foreground group, so cleanup can reach every child.
    proc = subprocess.Popen(
        [sys.executable, "-m", "shears.cli", "serve"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert ready is not None, (tmp_path / "serve.log").read_text()
        assert ready.status_code == 200, (tmp_path / "serve.log").read_text()
        children = _children(proc.pid)
        assert len(children) == 4  # uvicorn, the Celery worker, the notify worker, the sweeper
        assert (tmp_path / "data" / "shears.db").exists()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        for child in children:
            assert not Path(f"/proc/{child}").exists() or _is_zombie(child)
    finally:
        # Whatever failed above, leave no process behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True
