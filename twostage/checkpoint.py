"""Checkpoint files: plain tensors plus JSON-safe metadata, loadable with weights_only=True.

A checkpoint is {"format": FORMAT, "state_dict": {name: tensor}, "meta": {...}} and, in a
run's `last.pt`, also "optimizer", "scheduler", "scaler", "rng" (tensors and plain
containers only). The meta holds everything needed to use the weights without the run
folder: stage, classes, model {arch, encoder, in_channels, kwargs}, input_size,
normalization {mean, std}, for palm models box_rule (with the training boxes' fallback
box and side range) and palm_set (the SR record), and the resolved config, epoch, metrics, package version and git commit.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from .errors import TwostageError
from .io import atomic_path

FORMAT = "twostage-ckpt-1"
"""Format tag written into every checkpoint; a file without it is not ours."""

REQUIRED_META = ("stage", "classes", "model", "input_size", "normalization")
"""Meta keys a Predictor needs to rebuild and feed the network."""


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the package's source tree (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _check_json_safe(meta: dict) -> None:
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta is not JSON-safe: {e}") from None


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (a killed write never leaves a half file).

    Args:
        state_dict: model weights ({name: tensor}); moved to the CPU.
        meta: JSON-safe metadata (see module docstring); `version` and `git_commit` are added.
        extra: optional resume state (optimizer, scheduler, scaler, rng) of tensors and
            plain containers.
    """
    from . import __version__

    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    meta = {**meta, "version": __version__, "git_commit": git_commit()}
    _check_json_safe(meta)
    obj = {"format": FORMAT,
           "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
           "meta": meta}
    if extra:
        obj.update(extra)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file of a file or run folder path (a run folder means its best.pt)."""
    path = Path(path)
    return path / "best.pt" if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    expect_stage: str | None = None) -> dict:
    """Load a checkpoint with torch.load(weights_only=True): a file that would run code is refused.

    Raises:
        TwostageError naming the file if it is missing, not a twostage checkpoint, unsafe, or
        of another stage than `expect_stage`.
    """
    path = checkpoint_file(path)
    if not path.is_file():
        raise TwostageError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TwostageError(f"{path}: not a safe twostage checkpoint (weights_only load refused: {first})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise TwostageError(f"{path}: not a twostage checkpoint (format tag {FORMAT!r} missing)")
    meta = obj.get("meta")
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META):
        raise TwostageError(f"{path}: checkpoint meta incomplete (needs {', '.join(REQUIRED_META)})")
    if expect_stage is not None and meta["stage"] != expect_stage:
        raise TwostageError(f"{path}: a {meta['stage']!r} checkpoint, expected a {expect_stage!r} one")
    return obj
