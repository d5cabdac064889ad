"""The zip container (core.formats.pt2.container): names, entries, headers, limits, and the
bounded reads of the members the gate parses.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from core.errors import InvalidArchive, UnsafeArchive
from core.formats.pt2.gate import ArchiveLimits, inspect_archive
from tests.core.formats.pt2_archives import (
    CONSTANTS_CONFIG,
    MODEL_JSON,
    SAMPLE_INPUTS,
    WEIGHTS_CONFIG,
    rewrite,
)


def test_malformed_model_json_is_invalid(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "m.pt2", replace={MODEL_JSON: b"{not json"})
    with pytest.raises(InvalidArchive, match="not valid JSON"):
        inspect_archive(crafted)


@pytest.mark.parametrize(
    "member", [MODEL_JSON, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS, "archive_version"]
)
def test_missing_member_is_invalid(archives: dict[str, Path], tmp_path: Path, member: str) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "m.pt2", drop=[member])
    with pytest.raises(InvalidArchive, match=member):
        inspect_archive(crafted)


def test_oversized_json_is_invalid(archives: dict[str, Path]) -> None:
    with pytest.raises(InvalidArchive, match="reads at most"):
        inspect_archive(archives["resnet"], ArchiveLimits(max_json_bytes=1000))


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("resnet/../../etc/cron.d/x", r"'\.\.'"),
        ("/etc/passwd", "absolute"),
        ("resnet/data\\weights\\weight_0x", "backslash"),
        ("other/models/model.json", "top folder"),
        ("toplevel.txt", "top folder"),
        ("resnet/extra/notes.txt", "does not define"),
        ("resnet/data/weights/model.pt", "does not define"),  # legacy pickled state dict
        ("resnet/data/constants/custom_obj_0", "does not define"),
        ("resnet/models/other.json", "does not define"),
        ("resnet/models/", "directory"),
        ("resnet/models/model.json", "duplicate"),
        ("resnet/Models/model.json", "case"),
    ],
)
def test_bad_member_names_are_unsafe(
    archives: dict[str, Path], tmp_path: Path, name: str, match: str
) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "n.pt2", add=[(name, b"{}")])
    with pytest.raises(UnsafeArchive, match=match):
        inspect_archive(crafted)


def test_nul_in_member_name_is_unsafe(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "n.pt2", add=[("resnet/NULMARK", b"x")])
    # zipfile cannot write a NUL into a name; patch it into both headers (same length).
    crafted.write_bytes(crafted.read_bytes().replace(b"NULMARK", b"NUL\0ARK"))
    with pytest.raises(UnsafeArchive, match="NUL"):
        inspect_archive(crafted)


def test_symlink_member_is_unsafe(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(
        archives["resnet"],
        tmp_path / "s.pt2",
        add=[(symlink_info("resnet/data/weights/weight_99"), b"/etc/passwd")],
    )
    with pytest.raises(UnsafeArchive, match="symlink"):
        inspect_archive(crafted)


def test_zip_bomb_is_unsafe(archives: dict[str, Path], tmp_path: Path) -> None:
    bomb = zipfile.ZipInfo("resnet/data/weights/weight_99")
    bomb.compress_type = zipfile.ZIP_DEFLATED
    crafted = rewrite(archives["resnet"], tmp_path / "b.pt2", add=[(bomb, b"\0" * 4_000_000)])
    with pytest.raises(UnsafeArchive, match="zip bomb"):
        inspect_archive(crafted)


def test_encrypted_member_is_unsafe(archives: dict[str, Path], tmp_path: Path) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "e.pt2", add=[("resnet/ENCMARK", b"x")])
    raw = bytearray(crafted.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        # set the encryption bit in the local and central header of the added member
        at = raw.rfind(b"ENCMARK")
        at = raw.rfind(signature, 0, at if signature == b"PK\x03\x04" else len(raw))
        raw[at + flag_offset] |= 0x01
    crafted.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchive, match="encrypted"):
        inspect_archive(crafted)


def test_too_many_members_is_unsafe(archives: dict[str, Path]) -> None:
    with pytest.raises(UnsafeArchive, match="members; the limit is 5"):
        inspect_archive(archives["resnet"], ArchiveLimits(max_members=5))


def test_too_many_bytes_is_unsafe(archives: dict[str, Path]) -> None:
    with pytest.raises(UnsafeArchive, match="expands to more than"):
        inspect_archive(archives["resnet"], ArchiveLimits(max_total_bytes=10_000))


def test_truncated_zip_is_invalid(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["resnet"].read_bytes()
    crafted = tmp_path / "t.pt2"
    crafted.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArchive, match="truncated") as caught:
        inspect_archive(crafted)
    assert not isinstance(caught.value, UnsafeArchive)


def test_corrupt_member_is_invalid(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["resnet"].read_bytes()
    at = data.index(b'"graph_module"')  # inside the stored model.json: breaks its CRC
    crafted = tmp_path / "c.pt2"
    crafted.write_bytes(data[:at] + b"'" + data[at + 1 :])
    with pytest.raises(InvalidArchive, match="corrupt"):
        inspect_archive(crafted)


def test_local_header_that_disagrees_with_the_directory_is_unsafe(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    hidden, shown = b"resnet/extra/AAAAAAAAAAAAAAAA", b"resnet/data/weights/weight_99"
    assert len(hidden) == len(shown)
    crafted = rewrite(archives["resnet"], tmp_path / "h.pt2", add=[(hidden.decode(), b"x")])
    raw = crafted.read_bytes()
    central = raw.rindex(hidden)  # the central directory copy comes last
    # The central entry now names a whitelisted member; the local header still says extra/.
    crafted.write_bytes(raw[:central] + shown + raw[central + len(shown) :])
    with pytest.raises(UnsafeArchive, match="different name in its local header"):
        inspect_archive(crafted)


def test_member_count_that_disagrees_with_the_directory_is_unsafe(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    crafted = rewrite(archives["resnet"], tmp_path / "c.pt2")
    raw = bytearray(crafted.read_bytes())
    eocd = len(raw) - 22  # Python writes a classic end record without a comment
    assert raw[eocd : eocd + 4] == b"PK\x05\x06"
    count = int.from_bytes(raw[eocd + 10 : eocd + 12], "little")
    for field in (8, 10):  # entries on this disk, entries in total
        raw[eocd + field : eocd + field + 2] = (count - 1).to_bytes(2, "little")
    crafted.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchive, match="declares"):
        inspect_archive(crafted)


@pytest.mark.parametrize(
    ("copy", "where", "match"),
    [
        (False, "prepended", "zip64"),  # torch writes zip64 end records on every archive
        (True, "prepended", "data before its zip entries"),  # zipfile writes classic ones
        (False, "appended", "after the end"),
        (True, "appended", "after the end"),
    ],
)
def test_smuggled_bytes_around_the_zip_are_unsafe(
    archives: dict[str, Path], tmp_path: Path, copy: bool, where: str, match: str
) -> None:
    source = rewrite(archives["resnet"], tmp_path / "copy.pt2") if copy else archives["resnet"]
    data = source.read_bytes()
    crafted = tmp_path / "s.pt2"
    junk = b"PK\x03\x04" + b"\0" * 60
    crafted.write_bytes(junk + data if where == "prepended" else data + junk)
    with pytest.raises(UnsafeArchive, match=match):
        inspect_archive(crafted)
