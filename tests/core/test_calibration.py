"""Data-aware criteria rank a planted unimportant channel last, on calibration tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import InvalidSpec
from core.pipeline import MeasureConfig, PipelineData, run
from core.spec import JobSpec, PruningSpec
from core.structure import prune_program
from core.structure.slicing import mask_channels
from tests.core.archs import MLP, ResidualCNN, export


def spec(criterion: str, sparsity: float) -> PruningSpec:
    return PruningSpec(criterion=criterion, granularity="channel", sparsity=sparsity)


def ignored_by_next_layer() -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    model = MLP(16, depth=2)
    with torch.no_grad():
        model.layers[1].weight[:, 5] = 0.0  # channel 5 of layers.0 is read by nobody
    return export(model, (12,))


def test_apoz_ranks_an_always_zero_channel_last() -> None:
    torch.manual_seed(0)
    model = ResidualCNN(8, blocks=1)
    with torch.no_grad():
        model.blocks[0][1].bias[3] = -100.0  # after its ReLU, channel 3 is always zero
    program = export(model, (3, 8, 8))
    result = prune_program(program, spec("apoz", 1 / 8), calibration=(torch.randn(40, 3, 8, 8),))
    assert result.kept_out["blocks.0.0"] == [0, 1, 2, 4, 5, 6, 7]


@pytest.mark.parametrize("criterion", ["regression", "taylor"])
def test_a_channel_the_next_layer_ignores_goes_first(criterion: str) -> None:
    program = ignored_by_next_layer()
    result = prune_program(program, spec(criterion, 1 / 16), calibration=(torch.randn(70, 12),))
    assert result.kept_out["layers.0"] == [i for i in range(16) if i != 5]


def test_regression_refits_the_next_layer() -> None:
    torch.manual_seed(1)
    program = export(MLP(32, depth=2), (12,))
    x = torch.randn(300, 12)
    result = prune_program(program, spec("regression", 0.5), calibration=(x,))
    original = program.module()(x)
    masked = program.module()
    mask_channels(masked, result.analysis, result.plan.keep)  # same channels, no refit
    refit_error = (result.program.module()(x) - original).square().mean()
    plain_error = (masked(x) - original).square().mean()
    assert refit_error < plain_error


def test_data_aware_criteria_need_calibration() -> None:
    with pytest.raises(ValueError, match="calibration"):
        JobSpec(pruning=spec("taylor", 0.5))
    job = JobSpec(pruning=spec("apoz", 0.5), calibration={})
    assert job.calibration is not None
    # Left out, the sample count is the format's default, resolved where the format is known.
    assert job.calibration.num_samples is None
    with pytest.raises(InvalidSpec, match="calibration"):
        prune_program(ignored_by_next_layer(), spec("apoz", 0.5))


def test_pipeline_reads_the_calibration_dataset(tmp_path: Path) -> None:
    path = tmp_path / "m.pt2"
    torch.export.save(ignored_by_next_layer(), str(path))
    data = tmp_path / "calibration.npz"
    np.savez(data, inputs=np.random.default_rng(0).standard_normal((40, 12)).astype(np.float32))
    job = JobSpec(pruning=spec("taylor", 0.5), calibration={"num_samples": 32})
    result = run(
        job,
        path,
        tmp_path / "out",
        measure=MeasureConfig(batch_size=8, warmup=0, repeats=1),
        data=PipelineData(calibration=data),
    )
    assert result.metrics.params_after < 0.6 * result.metrics.params_before


def test_calibration_sample_defaults_follow_the_format(tmp_path: Path) -> None:
    """Left out, ``num_samples`` is 256 samples for a program and 128 blocks for a language
    model (the contract's defaults); given, it is taken as it is for both."""
    from core.formats import get_format
    from core.recovery import load_feeds
    from core.recovery_lm import load_lm_feeds
    from tests.core.text_corpus import corpus
    from tests.hf_factories import archive_folder, save_checkpoint

    program = tmp_path / "m.pt2"
    torch.export.save(ignored_by_next_layer(), str(program))
    inputs = tmp_path / "calibration.npz"
    np.savez(inputs, inputs=np.random.default_rng(0).standard_normal((300, 12)).astype(np.float32))
    info = get_format("pt2").inspect(program)
    _, folder = save_checkpoint("llama", tmp_path / "ck")
    model, _ = get_format("hf").load(archive_folder(folder, tmp_path / "llama.tar"))
    text = tmp_path / "corpus.txt"
    text.write_text(corpus())  # thousands of 8-token blocks
    for given, programs, blocks in ((None, 256, 128), (7, 7, 7)):
        calibration = {"num_samples": given} if given else {}
        job = JobSpec(pruning=spec("taylor", 0.5), calibration=calibration)
        feeds = load_feeds(job, PipelineData(calibration=inputs), info)
        assert feeds.calibration is not None
        assert len(feeds.calibration[0]) == programs
        lm_job = JobSpec(
            pruning=PruningSpec(criterion="wanda", granularity="unstructured", sparsity=0.5),
            calibration={**calibration, "seq_len": 8},
        )
        lm_feeds = load_lm_feeds(lm_job, PipelineData(calibration=text), model)
        assert lm_feeds.calibration is not None
        assert tuple(lm_feeds.calibration[0].shape) == (blocks, 8)


class PlainCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_regression_refits_the_next_convolution() -> None:
    torch.manual_seed(2)
    program = export(PlainCNN(), (3, 8, 8))
    x = torch.randn(48, 3, 8, 8)
    result = prune_program(program, spec("regression", 0.5), calibration=(x,))
    assert result.program.state_dict["b.weight"].shape == (8, 8, 3, 3)
    original = program.module()(x)
    masked = program.module()
    mask_channels(masked, result.analysis, result.plan.keep)
    refit_error = (result.program.module()(x) - original).square().mean()
    plain_error = (masked(x) - original).square().mean()
    assert refit_error < plain_error
