"""What the ``.pt2`` gate shares across its checks: the layout torch 2.13 writes and the limits.

Derived from what ``torch.export.save`` writes in torch 2.13 (see torch/export/pt2_archive/).
Constants only one check needs live beside that check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class ArchiveLimits:
    """Resource limits of the gate.

    ``max_json_bytes`` caps every member the gate reads into memory: the JSON members and the
    pickled sample inputs. Weight members are never read, only their sizes are checked.
    """

    max_members: int = 100_000
    max_total_bytes: int = 64 * 1024**3
    max_json_bytes: int = 256 * 1024**2
    max_compression_ratio: float = 200.0


EXPORT_HINT: Final = (
    "Export the model with torch.export.export(model, example_inputs) and save it with "
    'torch.export.save(program, "model.pt2"), then upload that file.'
)

ZIP_LOCAL_MAGIC: Final = b"PK\x03\x04"
ZIP_EMPTY_MAGIC: Final = b"PK\x05\x06"

# A member index as torch writes it (weight_0, tensor_12, data/3): no sign, no leading zero.
INDEX: Final = r"(?:0|[1-9][0-9]{0,8})"

MODEL_JSON: Final = "models/model.json"
M: Final = f"{MODEL_JSON}: "  # prefix of locations inside model.json in messages
WEIGHTS_CONFIG: Final = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG: Final = "data/constants/model_constants_config.json"
SAMPLE_INPUTS: Final = "data/sample_inputs/model.pt"

# torch._export.serde.schema.ScalarType -> (torch dtype name, element size in bytes).
DTYPES: Final[Mapping[int, tuple[str, int]]] = {
    1: ("uint8", 1),
    2: ("int8", 1),
    3: ("int16", 2),
    4: ("int32", 4),
    5: ("int64", 8),
    6: ("float16", 2),
    7: ("float32", 4),
    8: ("float64", 8),
    9: ("complex32", 4),
    10: ("complex64", 8),
    11: ("complex128", 16),
    12: ("bool", 1),
    13: ("bfloat16", 2),
    28: ("uint16", 2),
    29: ("float8_e4m3fn", 1),
    30: ("float8_e5m2", 1),
    31: ("float8_e4m3fnuz", 1),
    32: ("float8_e5m2fnuz", 1),
    33: ("float8_e8m0fnu", 1),
    34: ("uint32", 4),
    35: ("uint64", 8),
}
