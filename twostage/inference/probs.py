"""The saved-probabilities file (`infer --save-probs`, read by `ensemble --probs`): one
compressed npz per image, named after its PNG (docs/DESIGN.md §3, "Inference").

Arrays: `probs` (C, H, W) uint8 = round(p·PROBS_SCALE) and `classes` (C,) str. uint8 is 4×
smaller than float32 at a worst-case error of 1/510.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from typing import Sequence

import numpy as np
import torch

from ..classes import CLASSES
from ..errors import TwostageError
from ..io.files import atomic_path
from ..io.images import ENV_MAX_PIXELS, max_pixels

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
    """`read(npz)` on an opened `write_probs` file whose arrays were checked from their headers
    (before anything is decompressed: memory stays within the pixel limit); anything
    unreadable is one TwostageError naming the file."""
    try:
        # our own handle: np.load leaks the one it opens when the zip directory is unreadable
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            _check_arrays(z, path)
            return read(z)
    except TwostageError:
        raise
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error,
            NotImplementedError, RuntimeError) as e:  # zipfile: unknown compression, "encrypted" flag
        raise TwostageError(f"{path}: not a saved-probabilities file ({type(e).__name__}: {e})") from None


def _header(z, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `name` of an npz, read from its .npy header alone."""
    fmt = np.lib.format
    with z.zip.open(f"{name}.npy") as f:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"array {name}: npy format version {version}")
        shape, _, dtype = read(f)
    return shape, dtype


def _check_arrays(z, path: str | os.PathLike) -> None:
    """`probs` (C, H, W) uint8 and `classes` (C,) str, C ≤ 29 and H·W within `io.images.max_pixels()`."""
    if not isinstance(z, np.lib.npyio.NpzFile) or {"probs", "classes"} - set(z.files):
        raise TwostageError(f"{path}: not a saved-probabilities file (needs arrays 'probs' and 'classes')")
    shape, dtype = _header(z, "probs")
    cshape, cdtype = _header(z, "classes")
    if len(shape) != 3 or dtype != np.uint8 or cdtype.kind != "U" or cshape != shape[:1] \
            or not 1 <= shape[0] <= len(CLASSES):
        raise TwostageError(f"{path}: not a saved-probabilities file (probs {shape} {dtype}, classes {cshape} "
                            f"{cdtype}; expected (C, H, W) uint8 and (C,) names, C ≤ {len(CLASSES)})")
    if shape[1] * shape[2] > max_pixels():
        raise TwostageError(f"{path}: probabilities of a {shape[2]}x{shape[1]} image, over the limit of "
                            f"{max_pixels()} pixels (${ENV_MAX_PIXELS})")


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
