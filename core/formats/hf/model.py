"""Load a gated Hugging Face checkpoint, save a model back as one, count its parameters.

Loading copies only the members the gate passed, from the same open archive, into a fresh
temporary folder, then calls ``AutoModelForCausalLM.from_pretrained`` with remote code off,
local files only, safetensors only and the Hub offline. The folder lives as long as the
:class:`HfModel`: the pipeline calls :meth:`HfModel.close` (or uses it as a context manager)
when it is done, because saving copies the uploaded tokenizer and generation files from there.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import InvalidArchive, ModelLoadError, ShearsError
from core.formats.base import PathLike
from core.formats.hf.container import DEFAULT_LIMITS, Container, Limits
from core.formats.hf.gate import GENERATION_FILES, TOKENIZER, TOKENIZER_FILES, HfInfo, check
from core.formats.hf.safetensors_header import load_json

if TYPE_CHECKING:
    import tokenizers
    import torch
    from transformers import PreTrainedModel

# Carried into every artifact besides the tokenizer: a licence travels with derived weights.
_LICENSE_PREFIX = "LICENSE"


@dataclass
class HfModel:
    """A loaded checkpoint: the ``transformers`` model and what saving and data need beside it.

    ``source_dir`` is the temporary folder the upload was unpacked into (tokenizer and
    generation files are copied from it on save); :meth:`close` deletes it. ``eos_token_id``
    joins documents when text is tokenized (``None`` if the checkpoint names no EOS token).

    Example::

        model, info = HF.load("llama.tar")
        with model:
            logits = model.model(input_ids=ids).logits
            HF.save(model, out_dir)
    """

    model: PreTrainedModel
    tokenizer: tokenizers.Tokenizer | None
    source_dir: Path
    eos_token_id: int | None
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def close(self) -> None:
        """Delete the temporary source folder (idempotent); the model stays usable."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> HfModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: PathLike, limits: Limits = DEFAULT_LIMITS) -> tuple[HfModel, HfInfo]:
    """Gate the upload, unpack the checked members, load model and tokenizer.

    Raises:
        UnsupportedFormat, InvalidArchive, UnsafeArchive: the gate refused the upload.
        ModelLoadError: transformers or tokenizers could not build what the gate passed.
    """
    tmp = tempfile.TemporaryDirectory(prefix="shears-hf-")
    try:
        folder = Path(tmp.name)
        with Container(path, limits) as container:
            info = check(container)
            for member in container.in_order(list(container.members)):
                if "/" in member.name or member.name in ("", ".", ".."):  # the gate allows none
                    raise InvalidArchive(f"Unexpected member name {member.raw!a}.")
                container.copy(member, folder / member.name)
        model = _from_pretrained(folder, info)
        tokenizer = _tokenizer(folder)
        eos = eos_token_id(folder, tokenizer, model)
    except BaseException:
        tmp.cleanup()
        raise
    return HfModel(model, tokenizer, folder, eos, tmp), info


def _from_pretrained(folder: Path, info: HfInfo) -> PreTrainedModel:
    hub_offline()
    import transformers
    from transformers import AutoModelForCausalLM

    cls = getattr(transformers, info.architecture)
    # Explicit, so a config cannot ask for a kernel fetched from the Hub.
    attention = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            folder,
            trust_remote_code=False,
            local_files_only=True,
            use_safetensors=True,
            dtype="auto",
            attn_implementation=attention,
        )
    except ShearsError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"transformers could not load the {info.architecture} checkpoint ({exc})."
        ) from exc
    if type(model).__name__ != info.architecture:  # the gate matched model_type to it
        raise ModelLoadError(f"transformers built {type(model).__name__}, not {info.architecture}.")
    model.eval()
    loaded: PreTrainedModel = model
    return loaded


def hub_offline() -> None:
    """Switch the Hugging Face Hub client off for this process: no request ever leaves it.

    ``huggingface_hub`` reads this flag at every request (``is_offline_mode``), so it holds even
    where transformers was imported before; ``local_files_only`` already avoids the Hub.
    """
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _tokenizer(folder: Path) -> tokenizers.Tokenizer | None:
    if not (folder / TOKENIZER).is_file():
        return None
    import tokenizers

    try:
        return tokenizers.Tokenizer.from_file(str(folder / TOKENIZER))
    except Exception as exc:
        raise ModelLoadError(f"{TOKENIZER} could not be read by tokenizers ({exc}).") from exc


def eos_token_id(
    folder: Path, tokenizer: tokenizers.Tokenizer | None, model: PreTrainedModel | None
) -> int | None:
    """The EOS token: ``eos_token`` of tokenizer_config.json or special_tokens_map.json through the
    tokenizer, else ``eos_token_id`` of the generation config, else of the model config."""
    if tokenizer is not None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            token = _json_field(folder / name, "eos_token")
            if isinstance(token, dict):  # an AddedToken written as {"content": ..., ...}
                token = token.get("content")
            if isinstance(token, str) and (token_id := tokenizer.token_to_id(token)) is not None:
                return int(token_id)
    candidates = [_json_field(folder / "generation_config.json", "eos_token_id")]
    if model is not None:
        candidates.append(getattr(model.config, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _json_field(path: Path, key: str) -> Any:
    if not path.is_file():
        return None
    return load_json(path.read_bytes(), path.name).get(key)


def save(model: HfModel | PreTrainedModel, out_dir: Path) -> dict[str, Path]:
    """Write ``out_dir/model.tar``: ``save_pretrained`` (safetensors; tied weights stay tied),
    the uploaded tokenizer, generation and licence files, members at the root."""
    hf = model if isinstance(model, HfModel) else None
    module: Any = model.model if isinstance(model, HfModel) else model
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.tar"
    with tempfile.TemporaryDirectory(prefix="shears-hf-save-", dir=out_dir) as staging_name:
        staging = Path(staging_name)
        module.save_pretrained(staging)  # transformers 5 writes safetensors only
        if hf is not None:
            if hf._tmp is None:
                raise ModelLoadError("The model was closed; its tokenizer files are gone.")
            for name in sorted(os.listdir(hf.source_dir)):
                if (
                    name in TOKENIZER_FILES
                    or name in GENERATION_FILES
                    or name.startswith(_LICENSE_PREFIX)
                ):
                    shutil.copyfile(hf.source_dir / name, staging / name)
        partial = out_dir / "model.tar.partial"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(os.listdir(staging)):
                _add_file(tar, staging / name, name)
        partial.replace(target)
    return {"model": target}


def _add_file(tar: tarfile.TarFile, path: Path, name: str) -> None:
    """One regular file, owned by nobody in particular, with a fixed time (reproducible)."""
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o644
    info.mtime = 0
    with path.open("rb") as fh:
        tar.addfile(info, fh)


def count_parameters(model: HfModel | PreTrainedModel | torch.nn.Module) -> int:
    """Unique parameters: a tensor shared by two modules (tied embeddings) counts once."""
    module = model.model if isinstance(model, HfModel) else model
    seen: set[tuple[int, int]] = set()
    total = 0
    for param in module.parameters():  # already skips a Parameter object seen twice
        key = (param.data_ptr(), param.numel()) if param.device.type != "meta" else (id(param), 0)
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


__all__ = ["HfModel", "count_parameters", "eos_token_id", "hub_offline", "load", "save"]
