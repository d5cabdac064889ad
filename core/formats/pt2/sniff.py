"""What a file is, from its first bytes: a zip, a pickle, or something else.

Deciding is not gating: the answer picks the gate's path and the wording of a refusal.
"""

from __future__ import annotations

import os
import pickletools
import re
from typing import Final

from core.formats.pt2.constants import ZIP_EMPTY_MAGIC, ZIP_LOCAL_MAGIC

# Protocol 0/1 pickles have no magic number. These are the opcodes such a pickle realistically
# starts with (MARK, GLOBAL, EMPTY_LIST/DICT/TUPLE, NONE, INT, LONG, FLOAT, STRING, UNICODE).
_TEXT_PICKLE_FIRST: Final = frozenset(b"(c]})NILFSV")
_PICKLE_OPCODES: Final = frozenset(op.code for op in pickletools.opcodes)


def detect_format(head: bytes) -> str:
    """Classify a file from its first bytes: ``"zip"``, ``"pickle"`` or ``"unknown"``.

    Only the first 8 bytes are looked at. Protocol 0/1 pickles have no magic number, so those
    are recognised heuristically from their first opcode; the answer only chooses the wording
    of the refusal, both are refused.
    """
    head = head[:8]
    if head.startswith(ZIP_LOCAL_MAGIC) or head.startswith(ZIP_EMPTY_MAGIC):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:
        return "pickle"
    if head and head[0] in _TEXT_PICKLE_FIRST and _looks_like_text_pickle(head):
        return "pickle"
    return "unknown"


def claims_pt2(path: str | os.PathLike[str]) -> bool:
    """Whether the file is a zip archive: the container a ``.pt2`` program comes in."""
    with open(path, "rb") as fh:
        return detect_format(fh.read(8)) == "zip"


def _looks_like_text_pickle(head: bytes) -> bool:
    """Heuristic for protocol 0/1 pickles from their first opcode and what follows it.

    It only picks the wording of the refusal; a miss still ends in UnsupportedFormat.
    """
    first, rest = chr(head[0]), head[1:]
    if first in "(])}N":  # MARK, EMPTY_LIST, EMPTY_TUPLE, EMPTY_DICT, NONE: an opcode follows
        return not rest or rest[:1].decode("latin-1") in _PICKLE_OPCODES
    if first == "c":  # GLOBAL "module\nname\n"
        return re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_.]*(?:\n[A-Za-z0-9_.]*)?", rest) is not None
    if first in "ILF":  # INT/LONG/FLOAT "123\n"
        return re.match(rb"-?[0-9]", rest) is not None
    if first == "S":  # STRING "'text'\n"
        return rest[:1] in (b"'", b'"')
    # UNICODE "text\n": a text file starting with "V" would need a short first line.
    return b"\n" in rest
