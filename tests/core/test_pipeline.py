"""core.pipeline.run as a library, without the service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import InvalidSpec
from core.formats.pt2.program import load_program
from core.pipeline import MeasureConfig, run
from core.spec import JobSpec, PruningSpec
from tests.factories import PRUNABLE, export_resnet, resnet_module

FAST = MeasureConfig(batch_size=8, warmup=0, repeats=1)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_resnet(tmp_path_factory.mktemp("m") / "resnet.pt2")


def job(**pruning) -> JobSpec:
    return JobSpec(
        pruning=PruningSpec(**{"criterion": "l1", "granularity": "unstructured", **pruning})
    )


def test_sparsity_zero_is_the_identity(resnet: Path, tmp_path: Path) -> None:
    result = run(job(sparsity=0.0, scope="global"), resnet, tmp_path, measure=FAST)
    assert result.metrics.sparsity == 0.0
    original, _ = load_program(resnet)
    pruned, _ = load_program(result.model_path)
    for name, tensor in original.state_dict.items():
        assert torch.equal(tensor, pruned.state_dict[name]), name


def test_global_l1_removes_the_smallest_weights(resnet: Path, tmp_path: Path) -> None:
    stages = []
    # No cap, so the result must be exactly the global ranking computed here independently.
    result = run(
        job(sparsity=0.8, scope="global", max_layer_sparsity=1.0),
        resnet,
        tmp_path,
        measure=FAST,
        on_progress=lambda stage, fraction, message, data=None: stages.append((stage, fraction)),
    )
    assert [s for s, _ in stages] == ["loading", "pruning", "exporting", "evaluating", "done"]
    assert [f for _, f in stages] == sorted(f for _, f in stages)

    reference = resnet_module()
    weights = {n: reference.get_parameter(f"{n}.weight").detach() for n in PRUNABLE}
    everything = torch.cat([w.abs().flatten() for w in weights.values()])
    k = round(0.8 * everything.numel())
    threshold = everything.kthvalue(k).values
    pruned, info = load_program(result.model_path)
    for name in PRUNABLE:
        after = pruned.state_dict[f"{name}.weight"]
        removed = weights[name][after == 0].abs()
        kept = weights[name][after != 0].abs()
        assert removed.numel() == 0 or float(removed.max()) <= float(threshold)
        assert kept.numel() == 0 or float(kept.min()) >= float(threshold)
    assert sum(int((pruned.state_dict[f"{n}.weight"] == 0).sum()) for n in PRUNABLE) == k
    assert result.metrics.sparsity == pytest.approx(k / everything.numel())

    # The weights artifact holds the same tensors under the original names.
    saved = load_file(str(result.weights_path))
    for name, tensor in pruned.state_dict.items():
        assert torch.equal(saved[name], tensor)
    report = json.loads(result.report_path.read_text())
    assert [layer["name"] for layer in report["layers"]] == PRUNABLE
    assert report["spec"]["pruning"]["sparsity"] == 0.8
    assert info.inputs[0].dynamic_dims[0].dim == 0


def test_the_default_cap_keeps_every_layer_alive(resnet: Path, tmp_path: Path) -> None:
    result = run(job(sparsity=0.8, scope="global"), resnet, tmp_path, measure=FAST)
    assert max(layer.sparsity for layer in result.layers) <= 0.99
    assert result.metrics.sparsity == pytest.approx(0.8, abs=0.001)


def test_macs_are_counted_from_the_graph(resnet: Path, tmp_path: Path) -> None:
    result = run(job(sparsity=0.5), resnet, tmp_path, measure=FAST)
    # stem 8*1*9*64, two 8x8x3x3 convs at 8x8, down 16*8*9*16, two 16x16x3x3 at 4x4, head 256*10
    expected = 8 * 9 * 64 + 2 * 8 * 8 * 9 * 64 + 16 * 8 * 9 * 16 + 2 * 16 * 16 * 9 * 16 + 256 * 10
    assert result.metrics.macs_before == result.metrics.macs_after == expected
    assert result.metrics.latency_batch_size == 8


def test_random_is_seeded(resnet: Path, tmp_path: Path) -> None:
    a = run(job(criterion="random", seed=1, sparsity=0.5), resnet, tmp_path / "a", measure=FAST)
    b = run(job(criterion="random", seed=1, sparsity=0.5), resnet, tmp_path / "b", measure=FAST)
    c = run(job(criterion="random", seed=2, sparsity=0.5), resnet, tmp_path / "c", measure=FAST)
    wa, wb, wc = (load_file(str(r.weights_path))["stage1.c1.weight"] for r in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_dry_run_writes_only_the_report(resnet: Path, tmp_path: Path) -> None:
    spec = JobSpec(pruning=job(sparsity=0.7, scope="global").pruning, dry_run=True)
    result = run(spec, resnet, tmp_path, measure=FAST)
    assert result.model_path is None
    assert result.weights_path is None
    assert result.metrics.sparsity == pytest.approx(0.7, abs=0.001)
    assert result.metrics.latency_ms_after is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_spec_that_does_not_fit_raises_invalid_spec(resnet: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="classifier"):
        run(job(sparsity=0.5, exclude=["classifier"]), resnet, tmp_path, measure=FAST)
