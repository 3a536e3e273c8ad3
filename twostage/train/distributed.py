"""One CPU, one GPU or torchrun: the process-group facts, the device of this rank, and the
object exchange between ranks (rank 0 logs and writes; validation is gathered from all)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..devices import torch_device
from ..models import SegmentationNet


@dataclass
class Dist:
    """Process-group facts: rank 0 logs and writes; world > 1 means DDP."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device_pref: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on CUDA).
    A CUDA device comes back indexed and made current (set_device and DDP need the index);
    under torchrun it is the rank's own GPU (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = torch_device(device_pref, option="train.device", allow_auto=True)
    if device.type == "cuda":
        if world > 1:
            device = torch_device(f"cuda:{dist.local_rank}", option="LOCAL_RANK")
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def gather(obj: Any, dist: Dist) -> list:
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, dist: Dist) -> Any:
    if dist.world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def has_unused_parameters(model: SegmentationNet, in_channels: int, device: torch.device) -> bool:
    """Whether some parameters get no gradient (smp keeps the deeper encoder stages when
    encoder_depth < 5); DDP must then be told. Probed in eval mode: BN statistics unchanged."""
    x = torch.zeros(2, in_channels, 2 * model.stride, 2 * model.stride, device=device)
    model.eval()
    model(x).float().sum().backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    model.train()
    return unused
