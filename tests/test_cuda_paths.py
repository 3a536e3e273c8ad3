"""Where a user's device string reaches a CUDA API, on a CPU-only machine: torch.cuda is
faked (two GPUs, a current device, a `set_device` that rejects what real torch rejects), so the
CUDA branches of `devices.torch_device`, `init_dist`, the inference clock and the upscalers
run here. Real torch raises ValueError for `set_device(torch.device("cuda"))`; only a GPU run
had shown it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from twostage.devices import torch_device
from twostage.errors import TwostageError


class FakeCuda:
    """torch.cuda as seen on a machine with `count` GPUs; records the calls that need an index."""

    def __init__(self, count: int = 2):
        self.count, self.current = count, 0
        self.set_calls: list = []
        self.sync_calls: list = []

    def _index(self, device) -> int:
        """torch.cuda._utils._get_device_index: an int or an indexed CUDA device, nothing else."""
        if isinstance(device, str):
            device = torch.device(device)
        if isinstance(device, torch.device):
            if device.type != "cuda":
                raise ValueError(f"Expected a cuda device, but got: {device}")
            if device.index is None:
                raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
            device = device.index
        if not isinstance(device, int):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        if device >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return device

    def set_device(self, device) -> None:
        self.set_calls.append(device)
        self.current = self._index(device)

    def synchronize(self, device=None) -> None:
        self.sync_calls.append(device)
        if device is not None:
            self._index(device)


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    monkeypatch.setattr(torch.cuda, "set_device", fake.set_device)
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return fake


# --------------------------------------------------------------------------- devices.torch_device

@pytest.mark.parametrize("name, current, want", [("cuda", 0, "cuda:0"), ("cuda", 1, "cuda:1"), ("cuda:1", 0, "cuda:1"),
                                                 ("auto", 0, "cuda:0"), (torch.device("cuda"), 0, "cuda:0"),
                                                 ("cpu", 0, "cpu")])
def test_a_cuda_device_always_carries_its_index(cuda, name, current, want):
    cuda.current = current
    dev = torch_device(name, allow_auto=True)
    assert dev == torch.device(want) and (dev.type != "cuda" or dev.index is not None)


def test_a_cuda_index_beyond_the_machine_is_one_error(cuda):
    with pytest.raises(TwostageError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)$"):
        torch_device("cuda:2")


# --------------------------------------------------------------------------- train: init_dist

@pytest.mark.parametrize("pref, want", [("cuda", 0), ("auto", 0), ("cuda:1", 1)])
def test_init_dist_on_one_gpu(cuda, monkeypatch, pref, want):
    from twostage.train import init_dist

    started = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: started.append(a))
    dist, device = init_dist(pref)
    assert device == torch.device("cuda", want) and device.index == want  # DDP's device_ids=[device.index]
    assert cuda.set_calls == [device] and cuda.current == want
    assert (dist.rank, dist.world) == (0, 1) and started == []


@pytest.mark.parametrize("pref", ["cuda", "auto", "cuda:0"])
def test_init_dist_under_torchrun_takes_the_local_rank(cuda, monkeypatch, pref):
    from twostage.train import init_dist

    started = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: started.append(a))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dist, device = init_dist(pref)
    assert device == torch.device("cuda", 1) and cuda.set_calls == [device] and cuda.current == 1
    assert (dist.rank, dist.world, dist.local_rank, dist.main) == (1, 2, 1, False)
    assert started == [("nccl",)]


def test_init_dist_under_torchrun_on_cpu_uses_gloo(cuda, monkeypatch):
    from twostage.train import init_dist

    started = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: started.append(a))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist, device = init_dist("cpu")
    assert device == torch.device("cpu") and cuda.set_calls == [] and started == [("gloo",)]


def test_init_dist_under_torchrun_with_more_ranks_than_gpus_is_one_error(cuda, monkeypatch):
    from twostage.train import init_dist

    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("group started"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(TwostageError, match=r"^LOCAL_RANK cuda:3: this machine has 2 CUDA device\(s\)"):
        init_dist("cuda")
    assert cuda.set_calls == []


# --------------------------------------------------------------------------- infer: the step clock

@pytest.mark.parametrize("name, want", [("cuda", "cuda:0"), ("cuda:1", "cuda:1")])
def test_infer_clock_synchronizes_the_chain_device(cuda, name, want):
    """With --device cuda:1 the current device stays 0: a bare synchronize() would time the wrong GPU."""
    from twostage.inference.infer import _Clock

    clock = _Clock(torch_device(name))
    clock.lap("global")
    assert cuda.sync_calls == [torch.device(want)]


# --------------------------------------------------------------------------- prepare-sr / train-sr / infer: upscalers

class _RecordingNet(nn.Module):
    """Stands in for a basicsr network: records where it is moved, moves nothing."""

    def __init__(self):
        super().__init__()
        self.moved_to: list = []

    def to(self, *args, **kwargs):
        self.moved_to.append(args[0] if args else kwargs.get("device"))
        return self

    def half(self):
        return self


def test_network_upscaler_runs_on_an_indexed_device_in_fp16(cuda):
    """RealESRGANer is bypassed (its gpu_id is never read): the device is the one torch_device gives."""
    from twostage.sr.upscale import network_upscaler

    net = _RecordingNet()
    up = network_upscaler(net, "fake", 4, None, device="cuda")
    assert net.moved_to == [torch.device("cuda", 0)]
    assert up.device == "cuda"
