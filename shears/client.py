"""A typed Python client for the Shears API: upload, submit, wait, download.

Example::

    from shears import Client

    with Client("http://127.0.0.1:8000") as shears:
        model = shears.upload_model("resnet.pt2", name="resnet")
        job = shears.submit(
            model["id"],
            pruning={"criterion": "l1", "granularity": "unstructured", "sparsity": 0.8},
        )
        job = shears.wait(job["id"])
        shears.download(job["id"], path="pruned.pt2")

Every method returns the API's JSON body as a ``dict``. A problem document
(``application/problem+json``) raises :class:`ShearsAPIError`; network failures raise
``httpx.TransportError``. Progress bars (rich) go to stderr, and only when it is a terminal.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from types import TracebackType
from typing import IO, Any, cast

import httpx
from httpx_sse import connect_sse

__all__ = ["DEFAULT_URL", "Client", "ShearsAPIError", "ShearsClientError"]

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
_CHUNK = 1024 * 1024
Advance = Callable[[int], None]  # a byte progress bar's "n more bytes"
Show = Callable[[dict[str, Any]], None]  # a job progress bar's "the job is now this"


class ShearsClientError(Exception):
    """Something the client could not do; ``str(exc)`` says what, for a person."""


class ShearsAPIError(ShearsClientError):
    """The API answered with an error: the RFC 9457 problem document's fields."""

    def __init__(
        self,
        status: int,
        type: str,
        title: str,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = errors

    def __str__(self) -> str:
        return self.detail

    @classmethod
    def from_response(cls, response: httpx.Response) -> ShearsAPIError:
        """The error a non-2xx answer stands for; a body that is no problem document (a proxy's
        HTML page, say) still gives a status and a sentence."""
        body: Any = None
        with suppress(ValueError):
            body = response.json()
        if isinstance(body, dict) and "detail" in body:
            errors = body.get("errors")
            return cls(
                status=int(body.get("status", response.status_code)),
                type=str(body.get("type", "about:blank")),
                title=str(body.get("title", response.reason_phrase)),
                detail=str(body["detail"]),
                errors=errors if isinstance(errors, list) else None,
            )
        text = response.text.strip()[:200]
        detail = f"HTTP {response.status_code} {response.reason_phrase}" + (
            f": {text}" if text else ""
        )
        return cls(response.status_code, "about:blank", response.reason_phrase, detail)


class Client:
    """A Shears API client on one ``httpx.Client`` (connection reuse); close it or use ``with``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    @property
    def http(self) -> httpx.Client:
        """The underlying ``httpx.Client``: for routes this class does not wrap, and for hooks."""
        return self._http

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- uploads ---------------------------------------------------------------------------------

    def upload_model(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        """``POST /v1/models``: stream a ``.pt2`` (or an ``hf`` archive) and return the model."""
        return self._upload("/v1/models", Path(path), name)

    def upload_dataset(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        """``POST /v1/datasets``: stream a dataset file and return the dataset."""
        return self._upload("/v1/datasets", Path(path), name)

    def _upload(self, route: str, path: Path, name: str | None) -> dict[str, Any]:
        size = path.stat().st_size
        with path.open("rb") as f, _bar(f"uploading {path.name}", size) as advance:
            # httpx streams a file object in chunks (never whole in memory); the wrapper only
            # counts what it reads.
            upload = cast(IO[bytes], _CountingReader(f, advance))
            response = self._http.post(
                route, files={"file": (path.name, upload)}, data={"name": name} if name else {}
            )
        return _json(response)

    # -- jobs ------------------------------------------------------------------------------------

    def submit(
        self,
        model_id: str,
        pruning: dict[str, Any],
        fine_tune: dict[str, Any] | None = None,
        evaluation: dict[str, Any] | None = None,
        calibration: dict[str, Any] | None = None,
        dry_run: bool = False,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/jobs``: the accepted job (``status`` queued). Sections left ``None`` are
        not sent; ``idempotency_key`` makes a retried submit return the first job again."""
        body: dict[str, Any] = {"model_id": model_id, "pruning": pruning, "dry_run": dry_run}
        optional = {
            "name": name,
            "fine_tune": fine_tune,
            "evaluation": evaluation,
            "calibration": calibration,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _json(self._http.post("/v1/jobs", json=body, headers=headers))

    def get_job(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``: status, progress, metrics, error and artifacts."""
        return _json(self._http.get(f"/v1/jobs/{job_id}"))

    def wait(
        self,
        job_id: str,
        progress: bool = True,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Follow the job until it succeeds, fails or is cancelled, and return its final body.

        Follows the job's event stream (``GET /v1/jobs/{id}/events`` as Server-Sent Events):
        every change arrives as it happens, on one connection. A dropped connection is resumed
        after the last event seen (``Last-Event-ID``). Where the stream is unavailable (a proxy
        that answers it with something else, a server error), polls ``GET /v1/jobs/{id}`` every
        ``poll_interval`` seconds instead, with ``If-None-Match`` (a bodiless 304 while nothing
        changed). With ``progress`` and stderr a terminal, shows the job's stage and fraction.
        ``timeout`` (seconds) raises ``TimeoutError``; the job keeps running. A failed job is
        returned, not raised: look at ``status`` and ``error``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with _job_bar(job_id, progress) as show:
            response = self._http.get(f"/v1/jobs/{job_id}")
            job, etag = _json(response), response.headers.get("ETag")
            show(job)
            if job["status"] in FINISHED:
                return job
            with suppress(_StreamUnavailable):
                _EventStream(self._http, job_id, show, deadline).follow()
            # The final body once the stream saw the end; every few seconds where it could not.
            while True:
                response = self._http.get(
                    f"/v1/jobs/{job_id}", headers={"If-None-Match": etag} if etag else {}
                )
                if response.status_code != 304:
                    job, etag = _json(response), response.headers.get("ETag")
                    show(job)
                if job["status"] in FINISHED:
                    return job
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
                time.sleep(poll_interval)

    # -- artifacts -------------------------------------------------------------------------------

    def download(self, job_id: str, kind: str = "model", path: str | Path | None = None) -> Path:
        """Save the job's artifact of ``kind`` (``model``, ``weights``, ``report``, …) to
        ``path`` (default ``<job>-<kind>.<format>`` here) and return the path.

        A partial file already at ``path`` is resumed with ``Range``; the whole file is then
        checked against the artifact's sha256 (a mismatch after a resume starts over once; a
        mismatch on a fresh download removes the file and raises).
        """
        job = self.get_job(job_id)
        artifact = next((a for a in job["artifacts"] if a["kind"] == kind), None)
        if artifact is None:
            kinds = ", ".join(a["kind"] for a in job["artifacts"]) or "none"
            raise ShearsClientError(
                f"job {job_id} ({job['status']}) has no {kind!r} artifact (it has: {kinds})"
            )
        target = Path(path) if path is not None else Path(f"{job_id}-{kind}.{artifact['format']}")
        resumed = self._fetch(artifact, target, resume=True)
        if _sha256(target) == artifact["sha256"]:
            return target
        if resumed:  # the partial file was not a prefix of this artifact: start over
            self._fetch(artifact, target, resume=False)
            if _sha256(target) == artifact["sha256"]:
                return target
        target.unlink(missing_ok=True)
        raise ShearsClientError(
            f"the download of artifact {artifact['id']} did not match its sha256; file removed"
        )

    def _fetch(self, artifact: dict[str, Any], target: Path, *, resume: bool) -> bool:
        """Stream the artifact into ``target``; True when it continued a partial file."""
        size = int(artifact["size_bytes"])
        have = target.stat().st_size if resume and target.exists() else 0
        if have == size:
            return True  # complete already, as far as the size says: the sha256 will tell
        if have > size:
            have = 0
        headers = {}
        if have:
            # If-Range: should the artifact differ from what we started, the server sends it
            # whole (200) instead of a range of something else.
            headers = {"Range": f"bytes={have}-", "If-Range": f'"{artifact["sha256"]}"'}
        with self._http.stream("GET", artifact["download_url"], headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                raise ShearsAPIError.from_response(response)
            partial = response.status_code == 206
            start = have if partial else 0
            with (
                target.open("ab" if partial else "wb") as out,
                _bar(f"downloading {target.name}", size, start) as advance,
            ):
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    advance(len(chunk))
        return partial


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.is_error:
        raise ShearsAPIError.from_response(response)
    body: dict[str, Any] = response.json()
    return body


class _StreamUnavailable(Exception):
    """The event stream cannot be followed here; poll instead."""


class _EventStream:
    """Follows ``GET /v1/jobs/{id}/events`` as Server-Sent Events until the job is finished,
    reconnecting after a dropped connection with ``Last-Event-ID``."""

    # Reconnections in a row that bring nothing new before giving up on the stream.
    RETRIES = 3

    def __init__(self, http: httpx.Client, job_id: str, show: Show, deadline: float | None) -> None:
        self._http = http
        self._url = f"/v1/jobs/{job_id}/events"
        self._show = show
        self._deadline = deadline
        self._last_id: str | None = None
        self._finished = False

    def follow(self) -> None:
        """Returns once the stream said the job is finished; raises ``_StreamUnavailable``
        when it cannot be followed, ``ShearsAPIError`` when the API refuses (401, 404)."""
        failures = 0
        while not self._finished:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                return  # the caller's poll raises TimeoutError
            seen = self._last_id
            # A dropped connection, a timeout, a stream cut mid-event: resume after the last id.
            with suppress(httpx.TransportError, ValueError):
                self._read()
            failures = 0 if self._last_id != seen or self._finished else failures + 1
            if failures >= self.RETRIES:
                raise _StreamUnavailable

    def _read(self) -> None:
        headers = {"Last-Event-ID": self._last_id} if self._last_id else {}
        timeout = None
        if self._deadline is not None:  # a stream blocks in reads: bound them by the deadline
            timeout = httpx.Timeout(self._http.timeout.connect, read=self._remaining())
        kwargs: dict[str, Any] = {"headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        with connect_sse(self._http, "GET", self._url, **kwargs) as source:
            response = source.response
            if response.status_code == 204:  # resumed after the final event
                self._finished = True
                return
            if response.is_error and response.status_code < 500:
                response.read()
                raise ShearsAPIError.from_response(response)
            content_type = response.headers.get("content-type", "")
            if response.is_error or not content_type.startswith("text/event-stream"):
                raise _StreamUnavailable  # a server error, or a page instead of a stream
            for event in source.iter_sse():
                if not event.data:  # a keep-alive comment (httpx-sse yields it once ids began)
                    continue
                self._last_id = event.id or self._last_id
                if event.event == "progress":
                    state = event.json()
                    self._show({"status": state["status"], "progress": state})
                    self._finished = state["status"] in FINISHED
                elif (event.json().get("data") or {}).get("status") in FINISHED:
                    self._finished = True  # the job's final event

    def _remaining(self) -> float:
        assert self._deadline is not None
        return max(self._deadline - time.monotonic(), 0.1)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _interactive() -> bool:
    return sys.stderr.isatty()


class _CountingReader:
    """A binary file as httpx's multipart encoder reads it, reporting each chunk read."""

    def __init__(self, f: IO[bytes], advance: Advance) -> None:
        self._f = f
        self._advance = advance

    def read(self, n: int = -1) -> bytes:
        chunk = self._f.read(n)
        self._advance(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()


@contextmanager
def _bar(label: str, total: int, completed: int = 0) -> Iterator[Advance]:
    """A byte progress bar on stderr when it is a terminal; yields ``advance(n)`` either way."""
    if not _interactive():
        yield lambda n: None
        return
    # rich only where a bar is drawn: a script piping the output never imports it.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)


def _job_bar(job_id: str, enabled: bool) -> AbstractContextManager[Show]:
    if not (enabled and _interactive()):
        return nullcontext(lambda job: None)
    return _live_job_bar(job_id)


@contextmanager
def _live_job_bar(job_id: str) -> Iterator[Show]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("job {task.fields[job]} {task.fields[status]}: {task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task: TaskID = bar.add_task("queued", total=1.0, job=job_id, status="queued")

        def show(job: dict[str, Any]) -> None:
            stage = job.get("progress") or {}
            bar.update(
                task,
                description=str(stage.get("stage", "")),
                completed=float(stage.get("fraction") or 0.0),
                status=job["status"],
            )

        yield show
