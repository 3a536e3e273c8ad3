"""The calibration record: where `twostage calibrate` writes it, how the chain finds it, and
which checkpoint pair it is for (docs/DESIGN.md §3, "Calibration").

A record holds per-class fusion weights and thresholds chosen against one global and one palm
checkpoint; it names both by sha256, and the chain uses it only for that pair. Both
`calibrate` (which writes it) and `chain` (which reads it) import this module, so neither
imports the other.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .. import fusion
from ..checkpoint import checkpoint_file
from ..errors import TwostageError
from ..io.files import sha256_file
from ..io.readers import read_yaml

log = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"
"""Folder beside the palm checkpoint where `calibrate` writes by default and the chain looks."""

CALIBRATION_FILE = "calibration.json"
"""The record: chosen weights and thresholds, the checkpoints' sha256, grids, Dice before/after."""


def default_dir(palm_ckpt: str | os.PathLike) -> Path:
    """Where the calibration of a palm checkpoint lives: <palm run>/calibration."""
    return checkpoint_file(palm_ckpt).parent / CALIBRATION_DIR


def checkpoint_sha(path: str | os.PathLike) -> str:
    """The sha256 that ties a record to a checkpoint (a run folder means its best.pt)."""
    return sha256_file(checkpoint_file(path))


def pair_fields(global_ckpt: str | os.PathLike, palm_ckpt: str | os.PathLike) -> dict:
    """The record's fields naming the checkpoint pair it is valid for."""
    return {"global": str(global_ckpt), "global_sha256": checkpoint_sha(global_ckpt),
            "palm": str(palm_ckpt), "palm_sha256": checkpoint_sha(palm_ckpt)}


def find_calibration(global_ckpt: str | os.PathLike, palm_ckpt: str | os.PathLike,
                     where: str | os.PathLike | None = "auto") -> dict | None:
    """The calibration record to fuse this checkpoint pair with, or None (defaults).

    `where`: "auto" (beside the palm checkpoint, if there), "none"/None (never), or a folder
    or calibration.json. A record made for other checkpoints is a warning and is not used:
    weights chosen against one global model can make a bone worse with another."""
    if where is None or str(where) == "none":
        return None
    path = default_dir(palm_ckpt) if str(where) == "auto" else Path(where)
    if path.is_dir() or str(where) == "auto":
        path = path / CALIBRATION_FILE
    if not path.is_file():
        if str(where) == "auto":
            return None
        raise TwostageError(f"{where}: no {CALIBRATION_FILE} there (write one with `twostage calibrate`)")
    rec = read_yaml(path, "calibration record")  # JSON is YAML
    if not isinstance(rec, dict) or not isinstance(rec.get("fuse_weights"), dict) \
            or not isinstance(rec.get("thresholds"), dict):
        raise TwostageError(f"{path}: not a calibration record (no fuse_weights/thresholds mappings)")
    try:  # the values, checked where the file is named (the chain checks them again, per palm model)
        fusion.thresholds(rec["thresholds"])
        fusion.fuse_weights(rec["fuse_weights"])
    except TwostageError as e:
        raise TwostageError(f"{path}: {e}") from None
    for stage, ckpt in (("global", global_ckpt), ("palm", palm_ckpt)):
        if rec.get(f"{stage}_sha256") != checkpoint_sha(ckpt):
            log.warning("%s: calibrated against another %s checkpoint (%s), not %s; fusing with the default "
                        "weights and thresholds (re-run `twostage calibrate`, or --calibration none)",
                        path, stage, rec.get(stage), ckpt)
            return None
    return {**rec, "path": str(path)}
