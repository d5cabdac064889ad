"""The zip container of an upload: end records, names, entries and local headers.

Everything here looks at names and headers only, never at member content, except the
bounded reads of the members the gate parses (:func:`read_member`, :func:`read_json`).
"""

from __future__ import annotations

import json
import re
import stat
import struct
import zipfile
from collections.abc import Mapping
from typing import IO, Any, Final

from core.errors import InvalidArchive, UnsafeArchive, UnsupportedFormat
from core.formats.pt2.accessors import json_obj
from core.formats.pt2.constants import EXPORT_HINT, ZIP_LOCAL_MAGIC, ArchiveLimits

_EOCD_SIG: Final = b"PK\x05\x06"
_EOCD_SIZE: Final = 22
_ZIP64_LOCATOR_SIG: Final = b"PK\x06\x07"
_ZIP64_LOCATOR_SIZE: Final = 20
_ZIP64_EOCD_SIG: Final = b"PK\x06\x06"
_ZIP64_EOCD_SIZE: Final = 56
_LOCAL_HEADER_SIZE: Final = 30
# The central directory is read into memory by zipfile before we can look at a single entry,
# so bound it from the end record first. Torch's entries are ~100 bytes; 4 KiB is generous.
_MAX_CD_BYTES_PER_ENTRY: Final = 4096


def check_limits(limits: ArchiveLimits) -> None:
    if (
        limits.max_members < 1
        or limits.max_total_bytes < 1
        or limits.max_json_bytes < 1
        or not limits.max_compression_ratio >= 1.0
    ):
        raise ValueError(f"ArchiveLimits must be positive, got {limits!r}")


def open_zip(
    fh: IO[bytes], size: int, limits: ArchiveLimits, what: str
) -> tuple[zipfile.ZipFile, str, dict[str, zipfile.ZipInfo]]:
    """Open a zip after checking its container; return it, its top folder and rel-name map.

    Everything here looks at names and headers only, never at member content.
    """
    n_entries, cd_offset = check_end_records(fh, size, limits, what)
    try:
        zf = zipfile.ZipFile(fh)
    except Exception as exc:  # zipfile raises a zoo of types on malformed input
        raise InvalidArchive(f"{what} is not a readable zip archive ({exc}).") from exc
    try:
        infos = zf.infolist()
        if len(infos) != n_entries:
            # zipfile walks the central directory by size, miniz (torch) by count.
            raise UnsafeArchive(
                f"{what} declares {n_entries} members but its central directory holds "
                f"{len(infos)}; readers would disagree on its content."
            )
        prefix, members = _check_names(infos, what)
        _check_entries(infos, limits, what)
        check_local_headers(fh, infos, cd_offset, what)
    except BaseException:
        zf.close()
        raise
    return zf, prefix, members


def check_end_records(
    fh: IO[bytes], size: int, limits: ArchiveLimits, what: str
) -> tuple[int, int]:
    """Validate the end-of-central-directory records; return (entry count, directory offset).

    Runs before zipfile parses anything, so an absurd central directory is refused before it
    is read into memory. Comments, trailing and prepended data are refused because zip readers
    (Python's zipfile, torch's miniz) resolve them differently.
    """
    if size < _EOCD_SIZE:
        raise InvalidArchive(f"{what} is truncated (too short to be a zip archive).")
    fh.seek(size - _EOCD_SIZE)
    eocd = fh.read(_EOCD_SIZE)
    if eocd[:4] != _EOCD_SIG:
        fh.seek(max(0, size - 65_557))
        if _EOCD_SIG in fh.read():
            raise UnsafeArchive(
                f"{what} has a zip comment or data after the end of the archive; "
                "Shears refuses them because zip readers disagree on such files."
            )
        raise InvalidArchive(f"{what} is truncated or corrupt (no zip end record).")
    _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len = struct.unpack(
        "<4sHHHHIIH", eocd
    )
    if comment_len != 0:
        raise InvalidArchive(f"{what} is truncated (its zip comment is cut off).")
    cd_end = size - _EOCD_SIZE
    loc_pos = cd_end - _ZIP64_LOCATOR_SIZE
    locator = b""
    if loc_pos >= 0:
        fh.seek(loc_pos)
        locator = fh.read(_ZIP64_LOCATOR_SIZE)
    saturated = n_total == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF
    # torch (miniz) writes the zip64 end records on every archive, not only large ones.
    if locator[:4] == _ZIP64_LOCATOR_SIG:
        # Python's zipfile assumes the zip64 end record sits right before the locator while
        # miniz follows the locator's offset: require both to agree, and the classic record
        # to repeat the zip64 values wherever it is not saturated.
        _, loc_disk, rec_offset, n_disks = struct.unpack("<4sIQI", locator)
        rec_pos = loc_pos - _ZIP64_EOCD_SIZE
        if rec_pos < 0:
            raise InvalidArchive(f"{what} has a truncated zip64 end record.")
        fh.seek(rec_pos)
        rec = struct.unpack("<4sQHHIIQQQQ", fh.read(_ZIP64_EOCD_SIZE))
        _, _, _, _, disk64, cd_disk64, n_disk64, n_total64, cd_size64, cd_offset64 = rec
        if (
            rec[0] != _ZIP64_EOCD_SIG
            or rec_offset != rec_pos
            or rec[1] != _ZIP64_EOCD_SIZE - 12
            or loc_disk != 0
            or n_disks != 1
            or n_total not in (0xFFFF, n_total64)
            or n_disk not in (0xFFFF, n_disk64)
            or cd_size not in (0xFFFFFFFF, cd_size64)
            or cd_offset not in (0xFFFFFFFF, cd_offset64)
        ):
            raise UnsafeArchive(f"{what} has an inconsistent zip64 end record.")
        disk, cd_disk, n_disk, n_total = disk64, cd_disk64, n_disk64, n_total64
        cd_size, cd_offset, cd_end = cd_size64, cd_offset64, rec_pos
    elif saturated:
        raise InvalidArchive(f"{what} lacks the zip64 end record its end record refers to.")
    if disk != 0 or cd_disk != 0 or n_disk != n_total:
        raise InvalidArchive(f"{what} is a multi-part zip archive.")
    if n_total > limits.max_members:
        raise UnsafeArchive(f"{what} has {n_total} members; the limit is {limits.max_members}.")
    if cd_offset + cd_size != cd_end:
        raise UnsafeArchive(
            f"{what} has data before its zip entries or between its central directory "
            "and end record; Shears refuses it because zip readers disagree on such files."
        )
    if cd_size > max(n_total, 1) * _MAX_CD_BYTES_PER_ENTRY:
        raise UnsafeArchive(f"{what} has an oversized zip central directory.")
    return n_total, cd_offset


def _check_names(infos: list[zipfile.ZipInfo], what: str) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """Refuse names that could escape the extraction folder or confuse a reader.

    Returns the single top folder and the members keyed by their name below it.
    """
    prefix: str | None = None
    members: dict[str, zipfile.ZipInfo] = {}
    folded: set[str] = set()
    for info in infos:
        # orig_filename is the name before zipfile cut it at the first NUL; miniz keeps it all.
        name = info.orig_filename
        shown = ascii(name)
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
            raise UnsafeArchive(
                f"{what} has a member name with a NUL or control character: {shown}."
            )
        if "\\" in name:
            raise UnsafeArchive(f"{what} has a member name with a backslash: {shown}.")
        if name.startswith("/") or re.match(r"[A-Za-z]:", name):
            raise UnsafeArchive(f"{what} has an absolute member name: {shown}.")
        parts = name.split("/")
        if ".." in parts:
            raise UnsafeArchive(f"{what} has a member name with '..': {shown}.")
        if any(part in ("", ".") for part in parts):
            raise UnsafeArchive(
                f"{what} has a directory entry or an empty/'.' path component: {shown}."
            )
        if len(parts) < 2:
            raise UnsafeArchive(f"{what} has a member outside its top folder: {shown}.")
        if prefix is None:
            prefix = parts[0]
        elif parts[0] != prefix:
            raise UnsafeArchive(
                f"{what} has members outside its single top folder ({prefix!a} and {parts[0]!a})."
            )
        rel = "/".join(parts[1:])
        if rel in members:
            raise UnsafeArchive(f"{what} has a duplicate member: {shown}.")
        # miniz (torch's zip reader) looks names up case-insensitively.
        if name.casefold() in folded:
            raise UnsafeArchive(f"{what} has members whose names differ only in case: {shown}.")
        folded.add(name.casefold())
        members[rel] = info
    return prefix or "", members


def _check_entries(infos: list[zipfile.ZipInfo], limits: ArchiveLimits, what: str) -> None:
    total = 0
    for info in infos:
        shown = ascii(info.orig_filename)
        mode = info.external_attr >> 16
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise UnsafeArchive(f"{what} member {shown} is {kind}.")
        if info.external_attr & 0x10:  # MS-DOS directory attribute
            raise UnsafeArchive(f"{what} member {shown} is a directory.")
        if info.flag_bits & 0x41:  # traditional or strong encryption
            raise UnsafeArchive(f"{what} member {shown} is encrypted.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InvalidArchive(
                f"{what} member {shown} uses zip compression method "
                f"{info.compress_type}; torch archives use stored or deflate."
            )
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise InvalidArchive(f"{what} member {shown} has inconsistent sizes.")
        if info.file_size > 0:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                raise UnsafeArchive(
                    f"{what} member {shown} expands {ratio:.0f}x when decompressed "
                    f"(limit {limits.max_compression_ratio:g}x): refused as a zip bomb."
                )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise UnsafeArchive(f"{what} expands to more than {limits.max_total_bytes} bytes.")


def check_local_headers(
    fh: IO[bytes], infos: list[zipfile.ZipInfo], cd_offset: int, what: str
) -> None:
    """Compare every local header with its central entry and refuse overlapping members.

    Overlapping entries are how non-recursive zip bombs reuse one compressed blob many times;
    a local header that disagrees with the central directory is read differently by readers
    that trust one or the other.
    """
    end_of_previous = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        shown = ascii(info.orig_filename)
        if info.header_offset < end_of_previous:
            raise UnsafeArchive(f"{what} member {shown} overlaps another member.")
        fh.seek(info.header_offset)
        raw = fh.read(_LOCAL_HEADER_SIZE)
        if len(raw) != _LOCAL_HEADER_SIZE or raw[:4] != ZIP_LOCAL_MAGIC:
            raise InvalidArchive(f"{what} member {shown} has no valid local header.")
        (_, _, flags, method, _, _, _, csize, usize, name_len, extra_len) = struct.unpack(
            "<4sHHHHHIIIHH", raw
        )
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        if fh.read(name_len) != info.orig_filename.encode(encoding):
            raise UnsafeArchive(f"{what} member {shown} has a different name in its local header.")
        if method != info.compress_type or (flags & 0x41) != (info.flag_bits & 0x41):
            raise UnsafeArchive(f"{what} member {shown} disagrees with its local header.")
        sizes_in_header = not flags & 0x08 and 0xFFFFFFFF not in (csize, usize)
        if sizes_in_header and (csize, usize) != (info.compress_size, info.file_size):
            raise UnsafeArchive(f"{what} member {shown} has different sizes in its local header.")
        data_start = info.header_offset + _LOCAL_HEADER_SIZE + name_len + extra_len
        end_of_previous = data_start + info.compress_size
        if end_of_previous > cd_offset:
            raise InvalidArchive(f"{what} member {shown} runs past the end of the data.")
    if infos and min(i.header_offset for i in infos) != 0:
        raise UnsafeArchive(f"{what} has data before its first member.")


def check_whitelist(
    members: Mapping[str, zipfile.ZipInfo], patterns: tuple[re.Pattern[str], ...], what: str
) -> None:
    for rel, info in members.items():
        if not any(pattern.fullmatch(rel) for pattern in patterns):
            raise UnsafeArchive(
                f"{what} has a member the torch.export format does not define: "
                f"{info.orig_filename!a}."
            )


def classify_zip(zf: zipfile.ZipFile, prefix: str, members: Mapping[str, zipfile.ZipInfo]) -> None:
    """Refuse zips that are some other torch format, by their member names."""
    if "constants.pkl" in members or any(rel.startswith("code/") for rel in members):
        raise UnsupportedFormat(
            "The upload is a TorchScript archive (torch.jit.save). Shears only accepts "
            "torch.export programs. " + EXPORT_HINT
        )
    if "data.pkl" in members:
        raise UnsupportedFormat(
            "The upload is a torch.save checkpoint (a pickle inside a zip). Shears refuses "
            "pickled modules because unpickling runs arbitrary code. " + EXPORT_HINT
        )
    if "archive_format" not in members:
        raise UnsupportedFormat(
            "The upload is a zip archive but not a torch.export program (it has no "
            "archive_format member). " + EXPORT_HINT
        )


# --- reading members ------------------------------------------------------------------------


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, what: str) -> bytes:
    if info.file_size > cap:
        raise InvalidArchive(
            f"{what} is {info.file_size} bytes; Shears reads at most {cap} bytes of it."
        )
    try:
        with zf.open(info) as member:
            # The declared size was checked; read one byte more in case the data disagrees.
            data = member.read(cap + 1)
    except Exception as exc:  # BadZipFile (CRC), zlib.error, EOFError, ...
        raise InvalidArchive(f"{what} is corrupt ({exc}).") from exc
    if len(data) > cap:
        raise InvalidArchive(f"{what} is larger than its declared size.")
    return data


def read_json(
    zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], rel: str, cap: int
) -> dict[str, Any]:
    info = require_member(members, rel)
    data = read_member(zf, info, cap, rel)
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArchive(f"{rel} is not valid JSON ({exc}).") from exc
    return json_obj(parsed, rel)


def require_member(members: Mapping[str, zipfile.ZipInfo], rel: str) -> zipfile.ZipInfo:
    info = members.get(rel)
    if info is None:
        raise InvalidArchive(f"The archive has no {rel} member; it is not a complete .pt2.")
    return info
