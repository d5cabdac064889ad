"""The upload gate for Hugging Face checkpoints, and what it learns about them.

Why this exists: ``from_pretrained`` on an untrusted folder can run code -- pickled weights
(``pytorch_model.bin``, ``*.pt``) are unpickled, ``auto_map`` plus ``trust_remote_code`` imports
``modeling_*.py`` from the folder, and quantisation or kernel settings pull in other packages.
So the gate accepts only the members a ``save_pretrained`` folder with safetensors weights and a
tokenizer holds, refuses every JSON that asks for custom code, accepts only an architecture that
``AutoModelForCausalLM`` maps the config's ``model_type`` to, and checks every safetensors header
against its file. It reads the listing, the JSON members and the safetensors headers -- never a
weight -- and writes nothing to disk.

Order of refusals: the container (:mod:`core.formats.hf.container`: names, links, sizes) ->
the member allow-list -> the JSON members -> the architecture -> the safetensors headers.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from core.errors import InvalidArchive, UnsupportedFormat
from core.formats.base import DynamicDim, ModelInfo, PathLike, ProgramInput, PrunableLayer
from core.formats.hf.container import DEFAULT_LIMITS, Container, Limits, Member, read_exactly
from core.formats.hf.safetensors_header import (
    HEADER_LENGTH_BYTES,
    TORCH_DTYPE_NAMES,
    TensorEntry,
    header_length,
    load_json,
    parse_header,
)

HINT: Final = (
    "Upload a folder written by save_pretrained as .tar, .tar.gz or .zip: config.json, "
    "safetensors weights (model.safetensors, or shards with model.safetensors.index.json), "
    "tokenizer files, for an architecture that transformers ships -- no custom code and no "
    "pickled weights."
)

CONFIG: Final = "config.json"
WEIGHTS: Final = "model.safetensors"
INDEX: Final = "model.safetensors.index.json"
TOKENIZER: Final = "tokenizer.json"
_SHARD: Final = re.compile(r"model-[0-9]{1,6}-of-[0-9]{1,6}\.safetensors")
_LICENSE: Final = re.compile(r"LICENSE[A-Za-z0-9._-]*")

# The files a tokenizer or the generation settings bring, copied unchanged into every artifact.
TOKENIZER_FILES: Final = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
GENERATION_FILES: Final = ("generation_config.json",)
_JSON_MEMBERS: Final = frozenset(
    {
        CONFIG,
        INDEX,
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "added_tokens.json",
    }
)
_OTHER_MEMBERS: Final = frozenset(
    {WEIGHTS, "tokenizer.model", "merges.txt", "chat_template.jinja", "README.md"}
)
# Keys that ask transformers for code shipped with the checkpoint.
_CODE_KEYS: Final = frozenset({"auto_map", "trust_remote_code"})
# Token maps: their keys are tokens of the vocabulary, not settings ("auto_map" may be a token).
_TOKEN_MAPS: Final = {
    "vocab.json": (),
    "added_tokens.json": (),
    "tokenizer.json": ("model", "vocab"),
}
_PICKLE_SUFFIXES: Final = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack")
# Decoder layers: "model.layers.3.mlp.down_proj.weight", "transformer.h.3.attn.c_attn.weight".
_DECODER_WEIGHT: Final = re.compile(
    r"(?P<module>(?:.+\.)?(?:layers|h)\.(?P<layer>[0-9]+)\..+)\.weight"
)
# Layouts whose linear layers are transformers' Conv1D, which stores its weight as (in, out).
_CONV1D_MODEL_TYPES: Final = frozenset({"gpt2"})
# Tensors older transformers wrote that are buffers, not parameters (GPT-2's causal mask, rotary
# frequencies): stored in some checkpoints, ignored when loading.
_LEGACY_BUFFERS: Final = re.compile(r"(?:^|.*\.)(?:attn\.bias|attn\.masked_bias|inv_freq)")


@dataclass(frozen=True)
class HfConfig:
    """The sizes of a checkpoint, under one set of names whatever its config calls them."""

    model_type: str
    hidden_size: int | None
    intermediate_size: int | None
    num_hidden_layers: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    max_position_embeddings: int | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HfInfo(ModelInfo):
    """What the gate learnt about a Hugging Face checkpoint, from JSON and safetensors headers.

    ``prefix`` is the archive's top folder ("" for members at the root); ``dtype`` the torch
    name of the floating dtype most weights are stored in (``None`` if none is floating);
    ``files`` every member, by its name in the checkpoint folder.
    """

    architecture: str
    has_tokenizer: bool
    config: HfConfig
    dtype: str | None
    tie_word_embeddings: bool
    prefix: str
    files: tuple[str, ...]

    def details(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "has_tokenizer": self.has_tokenizer,
            "config": self.config.as_dict(),
        }


def claims(path: PathLike) -> bool:
    """Whether ``path`` is a ``.tar``, ``.tar.gz`` or ``.zip`` with ``config.json`` at its root or
    under its one top folder (a ``.pt2`` is a zip too, but never has one)."""
    from core.formats.hf.container import normalise, peek_names

    names = peek_names(path)
    if not names:
        return False
    parts = [normalise(name) for name in names]
    if ["config.json"] in parts:
        return True
    return any(len(p) == 2 and p[1] == "config.json" for p in parts) and (
        len({p[0] for p in parts}) == 1
    )


def inspect(path: PathLike, limits: Limits = DEFAULT_LIMITS) -> HfInfo:
    """Gate an upload and describe the checkpoint it holds, reading no weight.

    Raises:
        UnsupportedFormat: a member a save_pretrained folder with safetensors weights does not
            hold (``*.py``, pickled weights, ...), custom code asked for in any JSON, an
            architecture transformers does not ship as a causal LM.
        UnsafeArchive: links, devices, absolute or ``..`` names, duplicates, sizes past ``limits``.
        InvalidArchive: a malformed archive, JSON or safetensors header; missing members.
    """
    with Container(path, limits) as container:
        return check(container)


def check(container: Container) -> HfInfo:
    """:func:`inspect` on an archive that is already open (the loader copies from the same one)."""
    members = container.members
    _check_members(container)
    documents = {
        member.name: _read_json(container, member)
        for member in container.in_order(sorted(set(members) & _JSON_MEMBERS))
    }
    for name, document in documents.items():
        _check_no_code(name, document)
    if CONFIG not in documents:
        raise InvalidArchive(f"The checkpoint has no {CONFIG}. " + HINT)
    architecture, hf_config, tied = _check_config(documents[CONFIG])
    tensors = _check_weights(container, documents.get(INDEX))
    return _describe(container, architecture, hf_config, tied, tensors)


# -- members ---------------------------------------------------------------------------------


def _check_members(container: Container) -> None:
    for folder in container.folders:
        raise UnsupportedFormat(
            f"The archive has a folder {folder!a} inside the checkpoint; a save_pretrained "
            "folder has none. " + HINT
        )
    for name, member in container.members.items():
        if not _allowed(name):
            raise UnsupportedFormat(_refusal(member))
    names = set(container.members)
    shards = {name for name in names if _SHARD.fullmatch(name)}
    if CONFIG not in names:
        raise InvalidArchive(f"The checkpoint has no {CONFIG}. " + HINT)
    if WEIGHTS in names and (INDEX in names or shards):
        raise InvalidArchive(
            f"The checkpoint holds both {WEIGHTS} and sharded weights; keep one of them."
        )
    if WEIGHTS not in names and not (INDEX in names and shards):
        if shards or INDEX in names:
            missing = INDEX if shards else "the shards its index names"
            raise InvalidArchive(f"The checkpoint's sharded weights lack {missing}.")
        raise InvalidArchive(f"The checkpoint has no {WEIGHTS} (safetensors weights). " + HINT)


def _allowed(name: str) -> bool:
    return (
        name in _JSON_MEMBERS
        or name in _OTHER_MEMBERS
        or bool(_SHARD.fullmatch(name) or _LICENSE.fullmatch(name))
    )


def _refusal(member: Member) -> str:
    shown = ascii(member.raw)
    lower = member.name.lower()
    if lower.endswith(".py"):
        return f"The checkpoint holds Python code ({shown}); Shears runs no custom code. " + HINT
    if lower.endswith(_PICKLE_SUFFIXES):
        return (
            f"The checkpoint holds weights in a pickle-based or foreign format ({shown}); "
            "loading them can run code. Save with save_pretrained (safetensors). " + HINT
        )
    return f"The checkpoint holds a member Shears does not accept: {shown}. " + HINT


# -- JSON ------------------------------------------------------------------------------------


def _read_json(container: Container, member: Member) -> dict[str, Any]:
    cap = container.limits.max_json_bytes
    if member.size > cap:
        raise InvalidArchive(f"{member.name} is {member.size} bytes; Shears reads at most {cap}.")
    return load_json(container.read(member, member.size), member.name)


def _check_no_code(name: str, document: dict[str, Any]) -> None:
    skip = _TOKEN_MAPS.get(name)
    for path, key in _keys(document, ()):
        if skip is not None and path == skip:
            continue  # the keys of a token map are tokens
        if key in _CODE_KEYS:
            where = ".".join((*path, key))
            raise UnsupportedFormat(
                f"{name} sets {where!a}: the checkpoint asks for custom code, which Shears "
                "never runs. " + HINT
            )


def _keys(node: object, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every (parent path, key) of a JSON document, depth first, without recursion."""
    stack: list[tuple[object, tuple[str, ...]]] = [(node, path)]
    while stack:
        current, where = stack.pop()
        if isinstance(current, dict):
            for key, value in current.items():
                yield where, key
                stack.append((value, (*where, key)))
        elif isinstance(current, list):
            stack.extend((item, where) for item in current)


def _check_config(config: dict[str, Any]) -> tuple[str, HfConfig, bool]:
    """The architecture, sizes and tying of a config that names a causal LM transformers ships."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise UnsupportedFormat(f"{CONFIG} names no architecture. " + HINT)
    architecture = architectures[0]
    if not isinstance(architecture, str) or not isinstance(model_type, str):
        raise InvalidArchive(f"{CONFIG} must name model_type and architectures as strings.")
    expected = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    is_lm = architecture.endswith("ForCausalLM") or architecture == "GPT2LMHeadModel"
    if expected != architecture or not is_lm or not hasattr(transformers, architecture):
        raise UnsupportedFormat(
            f"{CONFIG} names the architecture {architecture!a} for model_type {model_type!a}; "
            "Shears accepts decoder-only causal LMs that transformers ships, with the "
            "architecture AutoModelForCausalLM maps that model_type to. " + HINT
        )
    if "quantization_config" in config:
        raise UnsupportedFormat(
            f"{CONFIG} describes a quantised checkpoint; Shears prunes floating-point weights."
        )
    try:
        parsed = CONFIG_MAPPING[model_type].from_dict(dict(config))
    except Exception as exc:  # the config class validates types and values
        raise InvalidArchive(f"{CONFIG} is not a valid {model_type} config ({exc}).") from exc
    text = parsed.get_text_config()
    hidden = _opt_int(getattr(text, "hidden_size", None))
    heads = _opt_int(getattr(text, "num_attention_heads", None))
    intermediate = _opt_int(getattr(text, "intermediate_size", None))
    if intermediate is None and model_type == "gpt2":
        intermediate = _opt_int(getattr(text, "n_inner", None)) or (hidden and 4 * hidden)
    head_dim = _opt_int(getattr(text, "head_dim", None))
    if head_dim is None and hidden and heads and hidden % heads == 0:
        head_dim = hidden // heads
    hf_config = HfConfig(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=_opt_int(getattr(text, "num_hidden_layers", None)),
        num_attention_heads=heads,
        num_key_value_heads=_opt_int(getattr(text, "num_key_value_heads", None)) or heads,
        head_dim=head_dim,
        vocab_size=_opt_int(getattr(text, "vocab_size", None)),
        max_position_embeddings=_opt_int(getattr(text, "max_position_embeddings", None)),
    )
    return architecture, hf_config, bool(getattr(text, "tie_word_embeddings", False))


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- weights ---------------------------------------------------------------------------------


def _check_weights(container: Container, index: Mapping[str, Any] | None) -> dict[str, TensorEntry]:
    """Every stored tensor by name, after checking each safetensors header (and the index)."""
    files = sorted(n for n in container.members if n == WEIGHTS or _SHARD.fullmatch(n))
    by_file: dict[str, list[TensorEntry]] = {}
    for member in container.in_order(files):
        by_file[member.name] = _read_header(container, member)
    tensors: dict[str, TensorEntry] = {}
    owner: dict[str, str] = {}
    for name, entries in by_file.items():
        for tensor in entries:
            if tensor.name in tensors:
                raise InvalidArchive(
                    f"The tensor {tensor.name!a} is stored twice ({owner[tensor.name]}, {name})."
                )
            tensors[tensor.name], owner[tensor.name] = tensor, name
    if index is not None:
        _check_index(index, owner, set(files))
    return tensors


def _read_header(container: Container, member: Member) -> list[TensorEntry]:
    with container.reading(member) as stream:
        first = read_exactly(stream, HEADER_LENGTH_BYTES, member.raw)
        length = header_length(first, member.size, container.limits.max_header_bytes, member.name)
        raw = read_exactly(stream, length, member.raw)
    return parse_header(raw, member.size, member.name)


def _check_index(index: Mapping[str, Any], owner: Mapping[str, str], shards: set[str]) -> None:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidArchive(f"{INDEX} needs a weight_map from tensor names to shard files.")
    unknown = set(weight_map.values()) - shards
    if unknown:
        raise InvalidArchive(f"{INDEX} points at shards the archive lacks: {sorted(unknown)!a}.")
    unused = shards - set(weight_map.values())
    if unused:
        raise InvalidArchive(f"The archive holds shards {INDEX} does not use: {sorted(unused)!a}.")
    if weight_map != dict(owner):
        wrong = sorted(set(weight_map.items()) ^ set(owner.items()))[:3]
        raise InvalidArchive(
            f"{INDEX} disagrees with the shards' own headers (for example {wrong!a})."
        )


# -- description -----------------------------------------------------------------------------


def _describe(
    container: Container,
    architecture: str,
    config: HfConfig,
    tied: bool,
    tensors: Mapping[str, TensorEntry],
) -> HfInfo:
    import transformers

    base = str(getattr(transformers, architecture).base_model_prefix)
    # Hub checkpoints of a base model (GPT-2's "h.0.attn...") omit the prefix modules carry.
    add_base = bool(base) and not any(name.startswith(base + ".") for name in tensors)
    counted = [
        t
        for name, t in tensors.items()
        if not _LEGACY_BUFFERS.fullmatch(name)
        # Tied: transformers points lm_head at the input embedding and drops a stored copy.
        and not (tied and name == "lm_head.weight")
    ]
    layers = []
    for name, tensor in tensors.items():
        match = _DECODER_WEIGHT.fullmatch(name)
        if match is None or len(tensor.shape) != 2:
            continue
        shape = tensor.shape
        if config.model_type in _CONV1D_MODEL_TYPES:
            shape = (shape[1], shape[0])  # Conv1D stores (in, out); report (out, in) like Linear
        module = f"{base}.{match['module']}" if add_base else match["module"]
        layers.append(
            (int(match["layer"]), module, PrunableLayer(module, "linear", shape, tensor.numel))
        )
    layers.sort(key=lambda item: (item[0], item[1]))
    max_pos = config.max_position_embeddings
    dtypes = Counter(TORCH_DTYPE_NAMES[t.dtype] for t in counted if t.dtype in TORCH_DTYPE_NAMES)
    return HfInfo(
        format="hf",
        num_parameters=sum(t.numel for t in counted),
        inputs=(
            ProgramInput(
                "input_ids", (1, 1), "int64", (DynamicDim(0, 1, None), DynamicDim(1, 1, max_pos))
            ),
        ),
        prunable_layers=tuple(layer for _, _, layer in layers),
        architecture=architecture,
        has_tokenizer=TOKENIZER in container.members,
        config=config,
        dtype=dtypes.most_common(1)[0][0] if dtypes else None,
        tie_word_embeddings=tied,
        prefix=container.prefix,
        files=tuple(sorted(container.members)),
    )


__all__ = ["HINT", "HfConfig", "HfInfo", "check", "claims", "inspect"]
