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
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from .errors import TwostageError
from .io.files import atomic_path

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
    return save_atomic(obj, path)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save, atomically, through a Python file: a full disk is an OSError atomic_path
    reports, and the same object is the same bytes (given a path, torch.save names the zip's
    root folder after it, i.e. after the temporary file, so every save differed)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return path


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file of a file or run folder path (a run folder means its best.pt)."""
    path = Path(path)
    return path / "best.pt" if path.is_dir() else path


def load_weights_only(path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`: a file that would run code, or any damage (the
    unpickler and the zip reader raise many types: struct.error, KeyError, ...), is one
    TwostageError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling raises many types
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch bolds part of its message
        first = text.splitlines()[0] if text else type(e).__name__
        raise TwostageError(f"{path}: not a safe {what} (weights_only load refused: {first})") from None


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
    obj = load_weights_only(path, "twostage checkpoint", map_location)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise TwostageError(f"{path}: not a twostage checkpoint (format tag {FORMAT!r} missing)")
    meta = obj.get("meta")
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META):
        raise TwostageError(f"{path}: checkpoint meta incomplete (needs {', '.join(REQUIRED_META)})")
    problem = _meta_problem(meta) or _state_problem(obj.get("state_dict"))
    if problem:
        raise TwostageError(f"{path}: not a usable twostage checkpoint ({problem})")
    if expect_stage is not None and meta["stage"] != expect_stage:
        raise TwostageError(f"{path}: a {meta['stage']!r} checkpoint, expected a {expect_stage!r} one")
    return obj


def _is_int(v: Any, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)


def _meta_problem(meta: dict) -> str | None:
    """What in a loaded meta a Predictor (and a palm stage) could not use, or None: every field
    they read, with its type, so a crafted or damaged meta fails here and not deep inside."""
    from .box import BoxRule
    from .config import MAX_IN_CHANNELS, STAGES
    from .window import Window

    model, norm, size = meta["model"], meta["normalization"], meta["input_size"]
    classes = meta["classes"]
    checks = [
        (meta["stage"] in STAGES, f"stage {meta['stage']!r} is not one of {', '.join(STAGES)}"),
        (isinstance(classes, list) and bool(classes) and all(isinstance(c, str) for c in classes)
         and len(set(classes)) == len(classes), "classes must be a list of distinct names"),
        (isinstance(model, dict) and isinstance(model.get("arch"), str) and isinstance(model.get("encoder"), str)
         and _is_int(model.get("in_channels")) and model["in_channels"] <= MAX_IN_CHANNELS
         and isinstance(model.get("kwargs", {}), dict) and all(isinstance(k, str) for k in model.get("kwargs", {})),
         f"model must hold arch and encoder names, in_channels 1 to {MAX_IN_CHANNELS} and a kwargs mapping"),
        (_is_int(size) or isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size),
         f"input_size {size!r} must be an integer or [h, w]"),
        (isinstance(norm, dict) and _numbers(norm.get("mean")) and _numbers(norm.get("std"))
         and 0 not in norm["std"], "normalization must hold finite mean and non-zero std lists"),
    ]
    for ok, problem in checks:
        if not ok:
            return problem
    channels = model["in_channels"]
    if any(len(norm[k]) not in (1, channels) for k in ("mean", "std")):
        return f"normalization has {len(norm['mean'])}/{len(norm['std'])} values for {channels} input channels"
    # a palm meta without them is reported by the chain, which says how to make one
    for key in ("box_rule", "palm_set"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            return f"{key} must be a mapping"
    record = meta.get("palm_set")
    if record and not (isinstance(record, dict) and isinstance(record.get("upscaler"), str)
                       and (record.get("scale") is None or _is_int(record.get("scale")))):
        return "palm_set must record the upscaler name and scale"
    if meta.get("box_rule"):
        try:
            BoxRule.from_dict(meta["box_rule"])
        except TwostageError as e:
            return str(e)
    try:
        Window.from_meta(meta)
    except TwostageError as e:
        return str(e)
    return None


def _state_problem(state: Any) -> str | None:
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        return "state_dict must map names to tensors"
    return None
