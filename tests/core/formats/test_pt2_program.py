"""Loading, running and measuring gated programs (core.formats.pt2.program)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import DeviceUnavailable
from core.formats import MeasureConfig, get_format
from core.formats.pt2.program import load_program, measure_program, module_on
from tests.factories import Digits, export_resnet

QUICK = {"batch_size": 2, "warmup": 1, "repeats": 2}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with torch.random.fork_rng():
        return export_resnet(tmp_path_factory.mktemp("program") / "resnet.pt2")


def test_module_on_never_moves_the_programs_own_weights(digits: Digits) -> None:
    program, _ = load_program(digits.model_path)
    before = {name: (t, t.dtype, t.clone()) for name, t in program.state_dict.items()}
    module = module_on(program, "cpu")
    module.to(torch.float64)  # what .to("cuda") does to the shared parameters of program.module()
    with torch.no_grad():
        module.get_parameter("c1.weight").zero_()
    for name, (tensor, dtype, value) in before.items():
        assert program.state_dict[name] is tensor
        assert tensor.dtype == dtype
        assert torch.equal(tensor, value), name


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_measure_program_reports_the_device_it_ran_on(resnet: Path, device: str) -> None:
    program, info = load_program(resnet)
    measured = measure_program(program, info, MeasureConfig(device=device, **QUICK))
    assert measured.device == device
    assert measured.batch_size == 2  # the dynamic batch, clamped to the exported range
    assert measured.macs > 0
    assert measured.latency_ms > 0
    # the program's own weights stay on the CPU, wherever it was measured
    assert all(t.device.type == "cpu" for t in program.state_dict.values())


def test_measuring_on_an_unavailable_device_raises(resnet: Path) -> None:
    program, info = load_program(resnet)
    absent = MeasureConfig(device="cuda:7", **QUICK)  # no machine here has eight GPUs
    with pytest.raises(DeviceUnavailable, match="cuda:7"):
        measure_program(program, info, absent)
    with pytest.raises(DeviceUnavailable, match="cuda:7"):  # through the format, the same
        get_format("pt2").measure(program, info, absent)
