"""The one place a user's device string becomes a torch device, and an allocation failure on
it a user error (docs/DESIGN.md §6); and how many CPU cores this process may use."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

from .errors import TwostageError


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's share,
    not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def torch_device(name: str | torch.device, option: str = "--device", allow_auto: bool = False) -> torch.device:
    """A torch device from a user string ("cpu", "cuda", "cuda:1"; "auto" where `allow_auto`:
    CUDA when present). A CUDA device always carries its index ("cuda" is the current device):
    `torch.cuda.set_device`, DDP's `device_ids` and `torch.cuda.synchronize(device)` need one.
    A malformed name, CUDA asked for on a machine without it, or an index beyond its GPUs is
    one TwostageError naming `option` (the flag or config key the string came from)."""
    if isinstance(name, torch.device):
        name = str(name)
    if allow_auto and name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        forms = "auto, cpu, cuda, cuda:N" if allow_auto else "cpu, cuda, cuda:1, ..."
        raise TwostageError(f"{option} {name!r}: not a torch device ({forms})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TwostageError(f"{option} {name}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        n = torch.cuda.device_count()
        if dev.index >= n:
            raise TwostageError(f"{option} {name}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
    return dev


_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")
"""How torch words an allocation failure that is not a torch.cuda.OutOfMemoryError (the CPU
allocator's RuntimeError, MPS, ROCm, cuDNN / cuBLAS workspaces)."""


@contextlib.contextmanager
def cudnn_autotune(device: torch.device) -> Iterator[None]:
    """On CUDA, cuDNN times its algorithms for each new input shape and keeps the fastest:
    worth it for the segmentation networks (one input size), not for the upscaler (a new crop
    size per image), so it is switched on around their calls only."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation failure: CUDA's OutOfMemoryError, Python's MemoryError
    (numpy, OpenCV), or a RuntimeError worded as one."""
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT)


@contextlib.contextmanager
def out_of_memory_as_error(step: str | Callable[[], str], lower: str | Callable[[], str]) -> Iterator[None]:
    """Turn an allocation failure inside the block into one TwostageError naming `step` (what
    ran out, on which device, at what size) and `lower` (the option that needs less memory);
    either may be a function, asked only after a failure (when the step is known). The cached
    CUDA blocks are released first, so the process can report and exit cleanly."""
    try:
        yield
        return
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
    # outside the except clause: the failed allocation's traceback (and the tensors its frames
    # hold) is gone, so the cache can really be released
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    step, lower = (v() if callable(v) else v for v in (step, lower))
    raise TwostageError(f"out of memory in {step}; lower {lower}")
