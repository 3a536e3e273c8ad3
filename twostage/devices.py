"""The one place a user's device string becomes a torch device (docs/DESIGN.md §6)."""
from __future__ import annotations

import torch

from .errors import TwostageError


def torch_device(name: str | torch.device, option: str = "--device", allow_auto: bool = False) -> torch.device:
    """A torch device from a user string ("cpu", "cuda", "cuda:1"; "auto" where `allow_auto`:
    CUDA when present). A malformed name, or CUDA asked for on a machine without it, is one
    TwostageError naming `option` (the flag or config key the string came from)."""
    if isinstance(name, torch.device):
        name = str(name)
    if allow_auto and name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        forms = "auto, cpu, cuda, cuda:N" if allow_auto else "cpu, cuda, cuda:1, ..."
        raise TwostageError(f"{option} {name!r}: not a torch device ({forms})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TwostageError(f"{option} {name}: CUDA is not available on this machine")
    return dev
