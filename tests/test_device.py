"""Device placement decisions, CUDA branches included, on any machine.

torch.cuda's queries are replaced by a stand-in that answers as a GPU would and records what was
asked of it; no tensor goes to a device, only the decisions and the recorded calls are checked.
"""

from __future__ import annotations

import pytest
import torch

from ich_tune.config.schema import TrainConfig
from ich_tune.training import device


class FakeCuda:
    """Answers torch.cuda's questions as configured and records every call made to it."""

    def __init__(self, available: bool, bf16: bool) -> None:
        self.available = available
        self.bf16 = bf16
        self.calls: list[tuple] = []

    def is_available(self) -> bool:
        self.calls.append(("is_available",))
        return self.available

    def is_bf16_supported(self) -> bool:
        self.calls.append(("is_bf16_supported",))
        return self.bf16

    def set_per_process_memory_fraction(self, fraction: float, where: torch.device) -> None:
        self.calls.append(("set_per_process_memory_fraction", fraction, where))

    def named(self, name: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == name]


@pytest.fixture
def fake_cuda(monkeypatch):
    """A factory: fake_cuda(available=True, bf16=True) installs a FakeCuda and returns it."""

    def install(available: bool = True, bf16: bool = True) -> FakeCuda:
        fake = FakeCuda(available, bf16)
        for name in ("is_available", "is_bf16_supported", "set_per_process_memory_fraction"):
            monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
        return fake

    return install


@pytest.mark.parametrize("available, kind", [(True, "cuda"), (False, "cpu")])
def test_pick_device_follows_cuda_availability(fake_cuda, available, kind):
    fake_cuda(available=available)
    assert device.pick_device() == torch.device(kind)


def test_place_caps_cuda_memory_at_the_configured_share(fake_cuda):
    cuda = fake_cuda()
    placement = device.place(TrainConfig(cuda_memory_fraction=0.25))
    assert placement.device == torch.device("cuda")
    assert cuda.named("set_per_process_memory_fraction") == [
        ("set_per_process_memory_fraction", 0.25, torch.device("cuda"))]


def test_place_leaves_cuda_memory_alone_when_no_share_is_set(fake_cuda):
    cuda = fake_cuda()
    assert device.place(TrainConfig()).device == torch.device("cuda")
    assert cuda.named("set_per_process_memory_fraction") == []


def test_place_on_cpu_asks_cuda_nothing_but_whether_it_is_there(fake_cuda):
    cuda = fake_cuda(available=False)
    placement = device.place(TrainConfig(cuda_memory_fraction=0.5, amp="auto", channels_last=True))
    assert placement == device.Placement(torch.device("cpu"), None, False)
    assert {call[0] for call in cuda.calls} == {"is_available"}


@pytest.mark.parametrize("amp, bf16, expected", [
    ("auto", True, torch.bfloat16),
    ("auto", False, torch.float16),
    ("off", True, None),
    ("bf16", False, torch.bfloat16),
    ("fp16", True, torch.float16),
])
def test_amp_dtype_on_cuda(fake_cuda, amp, bf16, expected):
    cuda = fake_cuda(bf16=bf16)
    assert device.place(TrainConfig(amp=amp)).half == expected
    assert len(cuda.named("is_bf16_supported")) == (amp == "auto")  # only auto asks the GPU


@pytest.mark.parametrize("amp", ["auto", "off", "bf16", "fp16"])
def test_amp_dtype_is_none_on_cpu(fake_cuda, amp):
    fake_cuda(available=False, bf16=True)
    assert device.amp_dtype(amp, torch.device("cpu")) is None
    assert device.place(TrainConfig(amp=amp)).half is None


@pytest.mark.parametrize("available, asked, expected", [
    (True, True, True),
    (True, False, False),
    (False, True, False),
    (False, False, False),
])
def test_channels_last_only_on_cuda_and_only_when_asked(fake_cuda, available, asked, expected):
    fake_cuda(available=available)
    assert device.place(TrainConfig(channels_last=asked)).channels_last is expected


def test_cpu_placement_runs_in_float32_and_keeps_the_memory_layout():
    placement = device.Placement(torch.device("cpu"), None, False)
    images = torch.zeros(2, 3, 4, 4)
    with placement.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert placement.images(images).is_contiguous()
