"""Streaming multipart uploads: the file part goes straight to a temp file on the storage disk,
hashed and size-checked chunk by chunk, so an upload is never whole in memory."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from api.errors import Problem, invalid_field
from shears.storage import Storage

_Info = TypeVar("_Info")
_MAX_FIELD_BYTES = 64 * 1024
_MULTIPART_OVERHEAD = 64 * 1024


def too_large(limit: int) -> Problem:
    return Problem(
        413,
        "payload-too-large",
        "Upload too large",
        f"The upload exceeds the limit of {limit} bytes (SHEARS_MAX_UPLOAD_BYTES).",
    )


@dataclass
class ReceivedUpload:
    """The ``file`` part on disk, and the form's small text fields."""

    path: Path
    size_bytes: int = 0
    sha256: str = ""
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


class _Receiver:
    def __init__(self, dest: Path, file_field: str, max_bytes: int) -> None:
        self.dest = dest
        self.file_field = file_field
        self.max_bytes = max_bytes
        self.upload = ReceivedUpload(path=dest)
        self.digest = hashlib.sha256()
        self.file: BinaryIO | None = None
        self.seen_file = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part_name: str | None = None
        self._part_is_file = False
        self._buffer = bytearray()

    # python-multipart callbacks --------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._headers = {}
        self._buffer = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        raw_name = options.get(b"name")
        self._part_name = raw_name.decode("utf-8", "replace") if raw_name else None
        self._part_is_file = self._part_name == self.file_field
        if self._part_is_file:
            if self.seen_file:
                raise invalid_field(["body", self.file_field], "send exactly one file part")
            self.seen_file = True
            filename = options.get(b"filename")
            self.upload.filename = filename.decode("utf-8", "replace") if filename else None
            self.file = self.dest.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part_is_file:
            assert self.file is not None
            self.upload.size_bytes += len(chunk)
            if self.upload.size_bytes > self.max_bytes:
                raise too_large(self.max_bytes)
            self.digest.update(chunk)
            self.file.write(chunk)
        else:
            self._buffer += chunk
            if len(self._buffer) > _MAX_FIELD_BYTES:
                raise invalid_field(["body", self._part_name or "?"], "form field too long")

    def on_part_end(self) -> None:
        if self._part_is_file and self.file is not None:
            self.file.close()
            self.file = None
        elif self._part_name:
            self.upload.fields[self._part_name] = self._buffer.decode("utf-8", "replace")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


async def receive_upload(
    request: Request, dest: Path, max_bytes: int, file_field: str = "file"
) -> ReceivedUpload:
    """Stream the request's multipart body; the ``file_field`` part is written to ``dest``.

    Raises:
        Problem: 413 past ``max_bytes``; 415 when the body is not multipart; 422 when there is no
            file part or the form is malformed. ``dest`` is removed on any failure.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise Problem(
            415,
            "unsupported-media-type",
            "Multipart form expected",
            "Send the file as multipart/form-data with a field named 'file' "
            "(curl -F file=@model.pt2).",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + _MULTIPART_OVERHEAD:
        raise too_large(max_bytes)

    receiver = _Receiver(dest, file_field, max_bytes)
    callbacks = {
        name: getattr(receiver, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except Problem:
        receiver.close()
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        raise
    except Exception as exc:  # python-multipart raises its own errors for malformed bodies
        receiver.close()
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        raise Problem(
            400,
            "malformed-multipart",
            "Malformed multipart body",
            f"The form could not be read: {exc}",
        ) from exc
    receiver.close()
    if not receiver.seen_file:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        raise invalid_field(["body", file_field], f"a file part named {file_field!r} is required")
    receiver.upload.sha256 = receiver.digest.hexdigest()
    return receiver.upload


async def receive_and_validate(
    request: Request,
    storage: Storage,
    max_bytes: int,
    validate: Callable[[Path], _Info],
    default_name: str,
) -> tuple[ReceivedUpload, _Info, str, Path]:
    """Stream the ``file`` part to a temp file, check the ``name`` field, run ``validate`` on the
    file in a thread (it reads only what it must, never unpickles) and return the upload, what
    ``validate`` found, the name and the temp path. The temp file is removed on any failure; the
    caller commits it to storage (or lets it be removed)."""
    temp = storage.temp_path(".upload")
    try:
        upload = await receive_upload(request, temp, max_bytes)
        name = upload.fields.get("name") or upload.filename or default_name
        if len(name) > 255:
            raise invalid_field(["body", "name"], "name: at most 255 characters")
        info = await run_in_threadpool(validate, temp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    return upload, info, name, temp
