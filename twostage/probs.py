"""The saved-probabilities file (`infer --save-probs`, read by `ensemble --probs`): one
compressed npz per image, named after its PNG (docs/DESIGN.md §5).

Arrays: `probs` (C, H, W) uint8 = round(p·PROBS_SCALE) and `classes` (C,) str. uint8 is 4×
smaller than float32 at a worst-case error of 1/510.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .classes import CLASSES
from .errors import TwostageError
from .io import atomic_path

PROBS_SCALE = 255
"""Saved probabilities are uint8 round(p·255): 1/510 worst-case error, 4× smaller than float32."""


def probs_file_name(image_name: str) -> str:
    """The file of an image's probabilities: its PNG stem + `.npz` (the key ensembling matches on)."""
    return os.path.splitext(os.path.basename(image_name))[0] + ".npz"


def write_probs(path: str | os.PathLike, probs: torch.Tensor, classes: Sequence[str] = CLASSES) -> None:
    """Write (C, H, W) probabilities as a compressed uint8-quantised npz, atomically.

    Arrays: `probs` (C, H, W) uint8 = round(p·PROBS_SCALE), `classes` (C,) str. The file name
    is the image's PNG basename with `.npz`: the key ensembling matches on.
    """
    q = torch.mul(probs, PROBS_SCALE).round_().clamp_(0, PROBS_SCALE).to(torch.uint8).cpu().numpy()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probs=q, classes=np.array(list(classes)))


def _open(path: str | os.PathLike, read):
    """`read(npz)` on an opened `write_probs` file; anything unreadable is one TwostageError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return read(z)
    except (OSError, KeyError, ValueError) as e:
        raise TwostageError(f"{path}: not a saved-probabilities file ({e})") from None


def read_probs(path: str | os.PathLike, out: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """(classes, (C, H, W) float32 probabilities) from a `write_probs` file.

    `out`: a float32 array to fill when it has the file's shape (a reader of many files
    reuses one buffer instead of faulting in a fresh 0.5 GB array per 2048² file)."""
    def read(z) -> tuple[list[str], np.ndarray]:
        q = z["probs"]
        buf = out if out is not None and out.shape == q.shape and out.dtype == np.float32 else None
        # one pass from uint8 to float32 (astype then divide would be two full-size passes)
        return [str(c) for c in z["classes"]], np.divide(q, np.float32(PROBS_SCALE), out=buf, dtype=np.float32)

    return _open(path, read)


def probs_classes(path: str | os.PathLike) -> list[str]:
    """The classes of a `write_probs` file, without decompressing its probabilities."""
    return _open(path, lambda z: [str(c) for c in z["classes"]])
