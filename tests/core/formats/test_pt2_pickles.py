"""The pickled sample inputs (core.formats.pt2.pickles): only a plain torch.save of tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from core.errors import InvalidArchive, UnsafeArchive
from core.formats.pt2.gate import inspect_archive
from tests.core.formats.pt2_archives import (
    SAMPLE_INPUTS,
    Canary,
    rewrite,
    torch_save_bytes,
)


def test_pickle_protocol_4_sample_inputs_are_refused(archives: dict[str, Path]) -> None:
    # Surprising but true in torch 2.13: torch.export.save(..., pickle_protocol=4) writes sample
    # inputs that torch.load(weights_only=True) cannot read (FRAME is unsupported), so
    # torch.export.load always falls back to weights_only=False for them. The opcode scan
    # resolves their STACK_GLOBALs and passes; torch.load's own check is what refuses them.
    with pytest.raises(UnsafeArchive, match=r"weights_only=True\) \(UnpicklingError\)"):
        inspect_archive(archives["proto4"])


def test_protocol_4_pickle_payload_is_refused(archives: dict[str, Path], tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    crafted = rewrite(
        archives["resnet"],
        tmp_path / "p4.pt2",
        replace={SAMPLE_INPUTS: torch_save_bytes(Canary(canary), pickle_protocol=4)},
    )
    with pytest.raises(UnsafeArchive, match=r"references 'io\.open'"):  # STACK_GLOBAL resolved
        inspect_archive(crafted)
    assert not canary.exists()


def test_raw_pickle_as_sample_inputs_is_refused(archives: dict[str, Path], tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    crafted = rewrite(
        archives["resnet"],
        tmp_path / "raw.pt2",
        replace={SAMPLE_INPUTS: pickle.dumps(Canary(canary))},
    )
    with pytest.raises(UnsafeArchive, match="sample_inputs"):
        inspect_archive(crafted)
    assert not canary.exists()


def test_sample_inputs_that_are_not_args_and_kwargs_are_invalid(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    crafted = rewrite(
        archives["resnet"],
        tmp_path / "list.pt2",
        replace={SAMPLE_INPUTS: torch_save_bytes([torch.zeros(2)])},
    )
    with pytest.raises(InvalidArchive, match="args, kwargs"):
        inspect_archive(crafted)
