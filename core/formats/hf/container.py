"""The archive around a Hugging Face checkpoint: ``.tar``, ``.tar.gz`` or ``.zip``, read safely.

This module knows containers, not checkpoints: it lists members, refuses every name or entry
type that could escape a folder or exhaust resources, reads the first bytes of a member, and
copies members into a folder -- always with the same open archive, so what is copied is what was
listed. Which members a checkpoint may hold is :mod:`core.formats.hf.gate`'s business.

Decisions:

* The kind comes from the first bytes (zip, gzip, tar), never from the file name.
* Links, devices, FIFOs, sparse files, absolute names, ``..``, backslashes, control characters
  and duplicate names (also when they differ only in case) are :class:`UnsafeArchive`. A leading
  ``./`` (``tar -C dir .``) is dropped; directory entries are allowed only for the top folder.
* Members are never extracted with ``tarfile``/``zipfile``'s own extractors: :meth:`Container.copy`
  writes one regular file whose name the caller has already checked, with ``O_EXCL``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Literal

from core.errors import InvalidArchive, ShearsError, UnsafeArchive
from core.formats.base import PathLike

Kind = Literal["zip", "tar", "tar.gz"]

_ZIP_MAGIC: Final = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC: Final = b"\x1f\x8b"
_TAR_MAGIC_OFFSET: Final = 257
_TAR_MAGICS: Final = (b"ustar\x0000", b"ustar  \x00")  # POSIX/pax and GNU
_COPY_CHUNK: Final = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Resource limits of the gate; every one is checked from the listing before any reading.

    ``max_compression_ratio`` applies per member in a zip and to the whole stream of a
    ``.tar.gz`` (declared member bytes over the compressed file size).
    """

    max_members: int = 1_000
    max_total_bytes: int = 512 * 1024**3
    max_json_bytes: int = 64 * 1024**2
    max_header_bytes: int = 100 * 1024**2
    max_compression_ratio: float = 200.0


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True)
class Member:
    """One regular file of the archive, named relative to the checkpoint folder."""

    name: str  # below the top folder: "config.json"
    raw: str  # as stored in the archive, for messages
    size: int
    index: int  # position in the archive (members are read in this order)


def sniff(head: bytes) -> Kind | None:
    """The container kind from the first 512+ bytes of a file (``None``: not one of ours).

    A gzip file is assumed to hold a tar; :func:`open_container` finds out if it does not.
    """
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_GZIP_MAGIC):
        return "tar.gz"
    magic = head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 8]
    if any(magic == m for m in _TAR_MAGICS):
        return "tar"
    return None


class Container:
    """An open archive whose listing passed the path, type and size checks.

    Use as a context manager; ``members`` maps the name below the top folder to its member.
    """

    def __init__(self, path: PathLike, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._fh: IO[bytes] = open(path, "rb")  # noqa: SIM115  (closed by close())
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._handles: dict[int, zipfile.ZipInfo | tarfile.TarInfo] = {}
        try:
            st = os.fstat(self._fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArchive("The upload is not a regular file.")
            self.size = st.st_size
            kind = sniff(self._fh.read(_TAR_MAGIC_OFFSET + 8))
            self._fh.seek(0)
            if kind is None:
                raise InvalidArchive("The upload is not a .tar, .tar.gz or .zip archive.")
            self.kind: Kind = kind
            raw = self._list_zip() if kind == "zip" else self._list_tar()
            self.prefix, self.members, self.folders = _layout(raw)
        except BaseException:
            self.close()
            raise

    # -- listing ---------------------------------------------------------------------------

    def _list_zip(self) -> list[tuple[str, bool, int, int]]:
        # Reused on purpose: the zip end-record and local-header checks written for ``.pt2``
        # apply to any zip (no prepended data, no comments, no overlapping or disagreeing
        # entries). Imported here, not at the top: importing the pt2 package registers pt2,
        # and hf must be registered (asked) first.
        from core.formats.pt2.constants import ArchiveLimits
        from core.formats.pt2.container import check_end_records, check_local_headers

        limits = ArchiveLimits(
            max_members=self.limits.max_members, max_total_bytes=self.limits.max_total_bytes
        )
        n_entries, cd_offset = check_end_records(self._fh, self.size, limits, "The upload")
        try:
            self._zip = zipfile.ZipFile(self._fh)
        except Exception as exc:  # zipfile raises many types on malformed input
            raise InvalidArchive(f"The upload is not a readable zip archive ({exc}).") from exc
        infos = self._zip.infolist()
        if len(infos) != n_entries:
            raise UnsafeArchive("The upload's zip directory disagrees with its end record.")
        records: list[tuple[str, bool, int, int]] = []
        total = 0
        for index, info in enumerate(infos):
            name = info.orig_filename  # before zipfile cut it at a NUL
            _check_name(name)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchive(f"The archive member {name!a} is a symbolic link.")
            is_dir = info.is_dir() or bool(info.external_attr & 0x10)
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR) or (
                stat.S_ISDIR(mode) and not is_dir
            ):
                raise UnsafeArchive(f"The archive member {name!a} is not a regular file.")
            if info.flag_bits & 0x41:
                raise UnsafeArchive(f"The archive member {name!a} is encrypted.")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise InvalidArchive(
                    f"The archive member {name!a} uses zip compression method "
                    f"{info.compress_type}; use stored or deflate."
                )
            if info.file_size / max(info.compress_size, 1) > self.limits.max_compression_ratio:
                raise UnsafeArchive(
                    f"The archive member {name!a} expands more than "
                    f"{self.limits.max_compression_ratio:g}x: refused as a zip bomb."
                )
            total = self._count(index, total, info.file_size)
            self._handles[index] = info
            records.append((name, is_dir, info.file_size, index))
        check_local_headers(self._fh, infos, cd_offset, "The upload")
        return records

    def _list_tar(self) -> list[tuple[str, bool, int, int]]:
        mode: Literal["r:", "r:gz"] = "r:gz" if self.kind == "tar.gz" else "r:"
        records: list[tuple[str, bool, int, int]] = []
        total = 0
        try:
            self._tar = tarfile.open(fileobj=self._fh, mode=mode)  # noqa: SIM115  (close())
            index = 0
            # next() reads one header; a member's data is skipped only by the following call,
            # so the limits below refuse a bomb before its bytes are decompressed.
            while (info := self._tar.next()) is not None:
                name = info.name
                _check_name(name)
                if info.issym() or info.islnk():
                    raise UnsafeArchive(
                        f"The archive member {name!a} is a {'symbolic' if info.issym() else 'hard'}"
                        f" link to {info.linkname!a}."
                    )
                if info.issparse() or not (info.isfile() or info.isdir()):
                    raise UnsafeArchive(f"The archive member {name!a} is not a regular file.")
                total = self._count(index, total, info.size)
                if self.kind == "tar.gz" and total > self.limits.max_compression_ratio * max(
                    self.size, 1
                ):
                    raise UnsafeArchive(
                        "The archive expands more than "
                        f"{self.limits.max_compression_ratio:g}x: refused as a gzip bomb."
                    )
                self._handles[index] = info
                records.append((name, info.isdir(), info.size, index))
                index += 1
        except (tarfile.TarError, EOFError, OSError, zlib.error, gzip.BadGzipFile) as exc:
            raise InvalidArchive(f"The upload is not a readable tar archive ({exc}).") from exc
        return records

    def _count(self, index: int, total: int, size: int) -> int:
        if index + 1 > self.limits.max_members:
            raise UnsafeArchive(f"The archive has more than {self.limits.max_members} members.")
        total += size
        if total > self.limits.max_total_bytes:
            raise UnsafeArchive(
                f"The archive expands to more than {self.limits.max_total_bytes} bytes."
            )
        return total

    # -- reading ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def reading(self, member: Member) -> Iterator[IO[bytes]]:
        """A stream of the member's bytes; read errors become :class:`InvalidArchive`.

        Read members in archive order (:meth:`in_order`): a ``.tar.gz`` is one forward stream.
        """
        handle = self._handles[member.index]
        try:
            if isinstance(handle, zipfile.ZipInfo):
                assert self._zip is not None
                stream: IO[bytes] | None = self._zip.open(handle)
            else:
                assert self._tar is not None
                stream = self._tar.extractfile(handle)
            if stream is None:  # not a regular file: the listing let none through
                raise InvalidArchive(f"The archive member {member.raw!a} is not a regular file.")
            with stream:
                yield stream
        except ShearsError:
            raise
        except Exception as exc:  # CRC errors, zlib.error, EOFError, a truncated tar
            raise InvalidArchive(f"The archive member {member.raw!a} is corrupt ({exc}).") from exc

    def read(self, member: Member, n: int) -> bytes:
        """The first ``n`` bytes of a member (all of it if it is shorter)."""
        with self.reading(member) as stream:
            return read_exactly(stream, min(n, member.size), member.raw)

    def copy(self, member: Member, dest: Path) -> None:
        """Write the member as the new regular file ``dest`` (never follows or replaces a path)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(dest, flags, 0o600)
        with os.fdopen(fd, "wb") as out, self.reading(member) as stream:
            shutil.copyfileobj(_Bounded(stream, member.size, member.raw), out, _COPY_CHUNK)
        if dest.stat().st_size != member.size:
            raise InvalidArchive(f"The archive member {member.raw!a} is shorter than declared.")

    def in_order(self, names: list[str]) -> Iterator[Member]:
        """The named members in archive order (one forward pass over a .tar.gz)."""
        yield from sorted((self.members[n] for n in names), key=lambda m: m.index)

    def close(self) -> None:
        for closable in (self._zip, self._tar, self._fh):
            if closable is not None:
                closable.close()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peek_names(path: PathLike, limits: Limits = DEFAULT_LIMITS) -> list[str] | None:
    """Member names of an archive, cheaply and without judging them (``None``: not an archive).

    Used to decide which format claims a file; the gate still checks everything. A ``.tar.gz``
    is read only up to its first ``config.json``.
    """
    with open(path, "rb") as fh:
        kind = sniff(fh.read(_TAR_MAGIC_OFFSET + 8))
        fh.seek(0)
        try:
            if kind == "zip":
                with zipfile.ZipFile(fh) as zf:
                    return [i.filename for i in zf.infolist()[: limits.max_members]]
            if kind in ("tar", "tar.gz"):
                names: list[str] = []
                with tarfile.open(fileobj=fh, mode="r:gz" if kind == "tar.gz" else "r:") as tf:
                    while len(names) < limits.max_members and (info := tf.next()) is not None:
                        names.append(info.name)
                        if info.name.rsplit("/", 1)[-1] == "config.json":
                            break
                return names
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, ValueError):
            return None
    return None


def normalise(name: str) -> list[str]:
    """Path components of a member name, a leading ``./`` and a trailing ``/`` dropped."""
    parts = name.split("/")
    while len(parts) > 1 and parts[0] == ".":
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]
    return parts


# -- helpers -------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    """Refuse a member name that could escape the folder or mean different files to readers."""
    shown = ascii(name)
    if not name:
        raise UnsafeArchive("The archive has a member with an empty name.")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise UnsafeArchive(f"The archive has a member name with a control character: {shown}.")
    if "\\" in name:
        raise UnsafeArchive(f"The archive has a member name with a backslash: {shown}.")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise UnsafeArchive(f"The archive has an absolute member name: {shown}.")
    parts = normalise(name)
    if ".." in parts:
        raise UnsafeArchive(f"The archive has a member name with '..': {shown}.")
    if parts != ["."] and any(part in ("", ".") for part in parts):
        raise UnsafeArchive(f"The archive has a member name with an empty or '.' part: {shown}.")


def _layout(
    records: list[tuple[str, bool, int, int]],
) -> tuple[str, dict[str, Member], list[str]]:
    """The top folder ("" for members at the root), the files keyed by their name below it, and
    any folder entries other than the top folder (a checkpoint has none: the gate refuses them).

    ``config.json`` at the root means a root layout; otherwise every file must share one top
    folder. Names are checked for duplicates, exactly and case-insensitively, after ``./`` is
    dropped (``config.json`` and ``./config.json`` are the same file to an extractor).
    """
    seen: set[str] = set()
    files: list[tuple[list[str], str, int, int]] = []
    dirs: list[list[str]] = []
    for raw, is_dir, size, index in records:
        parts = normalise(raw)
        key = "/".join(parts).casefold()
        if key in seen:
            raise UnsafeArchive(f"The archive has a duplicate member: {raw!a}.")
        seen.add(key)
        if is_dir:
            dirs.append(parts)
        else:
            files.append((parts, raw, size, index))
    if any(parts == ["config.json"] for parts, *_ in files):
        prefix = ""
    else:
        tops = {parts[0] for parts, *_ in files if len(parts) > 1}
        prefix = tops.pop() if len(tops) == 1 and all(len(p) > 1 for p, *_ in files) else ""
    members: dict[str, Member] = {}
    for parts, raw, size, index in files:
        name = "/".join(parts[1:] if prefix else parts)
        members[name] = Member(name=name, raw=raw, size=size, index=index)
    folders = ["/".join(parts) + "/" for parts in dirs if parts not in (["."], [prefix])]
    return prefix, members, folders


def read_exactly(stream: IO[bytes], n: int, what: str) -> bytes:
    """Exactly ``n`` bytes of ``stream`` (:class:`InvalidArchive` if it ends sooner)."""
    data = stream.read(n)
    if len(data) != n:
        raise InvalidArchive(f"The archive member {what!a} is shorter than declared.")
    return data


class _Bounded:
    """A read-only view of a stream that refuses to yield more than ``size`` bytes."""

    def __init__(self, stream: IO[bytes], size: int, what: str) -> None:
        self._stream, self._left, self._what = stream, size, what

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            if self._stream.read(1):
                raise InvalidArchive(f"The archive member {self._what!a} is longer than declared.")
            return b""
        n = self._left if n < 0 else min(n, self._left)
        data = self._stream.read(n)
        self._left -= len(data)
        return data
