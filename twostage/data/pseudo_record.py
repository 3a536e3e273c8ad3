"""The pseudo-label record (`pseudo.json`) at the root of a dataset made by `pseudo-label`:
training reads it to weight and filter those images, so it is part of the data layer; the
command that writes it is `twostage.inference.pseudo`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..classes import CLASSES
from ..errors import TwostageError
from ..io.readers import read_json
from .layout import IMAGE_DIR

PSEUDO_RECORD = "pseudo.json"
"""The record at the root of a pseudo-labelled dataset: its presence marks the folder as such."""
RECORD_FORMAT = 1


def read_pseudo_record(root: str | os.PathLike) -> dict | None:
    """The pseudo.json of a dataset root (or, for a split folder, of the root above it); None
    for a dataset that is not pseudo-labelled. A malformed record is a TwostageError."""
    root = Path(root)
    for folder in ([root, root.parent] if (root / IMAGE_DIR).is_dir() else [root]):
        path = folder / PSEUDO_RECORD
        if path.is_file():
            record = read_json(path, "pseudo-label record")
            problem = _record_problem(record)
            if problem:
                raise TwostageError(f"{path}: {problem}")
            return record
    return None


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return f"not a pseudo-label record of format {RECORD_FORMAT}"
    dropped = record.get("dropped_classes")
    if not isinstance(dropped, dict) or not all(
            isinstance(v, list) and all(c in CLASSES for c in v) for v in dropped.values()):
        return "dropped_classes must map image paths to lists of class names"
    if not isinstance(record.get("dropped_images"), list):
        return "dropped_images must be a list of image paths"
    if not isinstance(record.get("confidence"), (dict, type(None))):
        return "confidence must be a mapping or null"
    return None
