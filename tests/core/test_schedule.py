"""Iterative pruning on the cubic AGP schedule, with a hook between rounds for fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.formats.pt2.program import load_program
from core.pipeline import MeasureConfig, run
from core.schedule import agp_fractions, at_fraction, relative_step, round_steps, shares_budget
from core.spec import JobSpec, PruningSpec
from tests.core.archs import ResidualCNN, export
from tests.factories import PRUNABLE, export_resnet

FAST = MeasureConfig(batch_size=8, warmup=0, repeats=1)


def test_agp_is_cubic_and_ends_at_the_target() -> None:
    fractions = agp_fractions(4)
    assert fractions == pytest.approx([1 - 0.75**3, 1 - 0.5**3, 1 - 0.25**3, 1.0])
    assert agp_fractions(1) == [1.0]
    spec = PruningSpec(
        criterion="l1",
        granularity="unstructured",
        sparsity=0.8,
        layer_sparsity={"a*": 0.4},
        schedule={"kind": "iterative", "rounds": 4},
    )
    assert at_fraction(spec, 0.5).sparsity == pytest.approx(0.4)
    assert at_fraction(spec, 0.5).layer_sparsity == {"a*": pytest.approx(0.2)}
    # Relative steps compose back to the target: (1 - 0.5)(1 - r) = 1 - 0.8.
    assert relative_step(spec, 0.625, 1.0).sparsity == pytest.approx(1 - 0.2 / 0.5)


def test_a_shared_budget_trains_the_fine_tunes_steps_half_while_the_sparsity_climbs() -> None:
    # Added: a round's share between rounds, then the whole fine-tune (today's default).
    assert round_steps(5, 110, shared=False) == (22, 110)
    # Shared: 4 x 13 steps between the five rounds, the other 58 at the final sparsity.
    assert round_steps(5, 110, shared=True) == (13, 58)
    for rounds in (2, 3, 5, 9):
        for total in (1, 7, 86, 344):
            between, last = round_steps(rounds, total, shared=True)
            assert between >= 1
            assert last >= total / 2 or total < 2 * (rounds - 1)
            if total >= 2 * (rounds - 1):
                assert between * (rounds - 1) + last == total
    assert round_steps(1, 50, shared=True) == (0, 50)
    shared = PruningSpec(
        criterion="l1",
        granularity="unstructured",
        sparsity=0.5,
        schedule={"kind": "iterative", "rounds": 3, "fine_tune_budget": "shared"},
    )
    assert shares_budget(shared)
    added = shared.model_dump() | {"schedule": {"kind": "iterative", "rounds": 3}}
    assert not shares_budget(PruningSpec(**added))
    with pytest.raises(ValueError, match="fine_tune_budget"):
        PruningSpec(
            criterion="l1",
            granularity="unstructured",
            sparsity=0.5,
            schedule={"kind": "iterative", "fine_tune_budget": "doubled"},
        )


def test_n_m_is_one_shot_only() -> None:
    with pytest.raises(ValueError, match="one shot"):
        PruningSpec(criterion="l1", granularity="n:m", schedule={"kind": "iterative", "rounds": 2})


def test_iterative_unstructured_ends_exact_and_calls_the_hook(tmp_path: Path) -> None:
    model = export_resnet(tmp_path / "m.pt2")
    seen: list[tuple[int, int, float]] = []

    def fine_tune(t: int, rounds: int, program: torch.export.ExportedProgram) -> None:
        weights = [program.state_dict[f"{n}.weight"] for n in PRUNABLE]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        seen.append((t, rounds, zeros))
        with torch.no_grad():  # a careless fine-tune that regrows every pruned weight
            for w in weights:
                w.add_(0.01)

    spec = JobSpec(
        pruning=PruningSpec(
            criterion="l1",
            granularity="unstructured",
            sparsity=0.8,
            scope="global",
            max_layer_sparsity=1.0,
            schedule={"kind": "iterative", "rounds": 3},
        )
    )
    result = run(spec, model, tmp_path / "out", measure=FAST, on_round=fine_tune)
    assert [(t, n) for t, n, _ in seen] == [(1, 3), (2, 3)]
    assert seen[0][2] == pytest.approx(0.8 * (1 - (2 / 3) ** 3), abs=0.01)
    assert seen[1][2] == pytest.approx(0.8 * (1 - (1 / 3) ** 3), abs=0.01)
    total = sum(layer.params for layer in result.layers)
    assert sum(layer.params - layer.nonzero for layer in result.layers) == round(0.8 * total)


def test_iterative_channel_pruning_shrinks_each_round(tmp_path: Path) -> None:
    path = tmp_path / "m.pt2"
    program = export(ResidualCNN(16, blocks=1), (3, 8, 8))
    torch.export.save(program, str(path))
    sizes: list[int] = []

    def hook(t: int, rounds: int, p: torch.export.ExportedProgram) -> None:
        sizes.append(sum(x.numel() for x in p.parameters()))

    spec = JobSpec(
        pruning=PruningSpec(
            criterion="l2",
            granularity="channel",
            sparsity=0.5,
            schedule={"kind": "iterative", "rounds": 3},
        )
    )
    result = run(spec, path, tmp_path / "out", measure=FAST, on_round=hook)
    assert len(sizes) == 2
    assert sizes[0] > sizes[1] >= result.metrics.params_after
    pruned, _ = load_program(result.model_path)
    report = json.loads(result.report_path.read_text())
    for layer in report["layers"]:
        kept = layer["kept_channels"]
        if kept is not None:  # indices into the uploaded program's channels
            assert (
                len(kept) == len(set(kept)) == pruned.state_dict[f"{layer['name']}.weight"].shape[0]
            )
            assert max(kept) < layer["shape_before"][0]
    stem = pruned.state_dict["stem.weight"].shape[0]
    assert stem == 8  # 16 channels, half removed over three rounds
