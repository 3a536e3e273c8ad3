"""A training sample's masks, rasterised from its fixed annotations, and the disk cache that
spares training re-rasterising them every epoch."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..classes import CLASSES
from ..errors import TwostageError
from ..io.files import sha256_file, write_bytes_atomic
from ..io.images import png_size
from .annotations import rasterize
from .fixes import Fixes, load_annotations
from .layout import Sample

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the rasteriser or the file layout changes


class MaskCache:
    """Rasterised masks on disk, so training does not re-rasterise polygons every epoch.

    One .npz per sample: the bounding box of each class and its bit-packed pixels, plus the
    key (JSON content hash, image size, this image's fixes, class list). A changed key, or a
    file that does not load, is rebuilt; concurrent writers are safe (atomic rename).
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.dir = Path(cache_dir)

    def path(self, sample: Sample) -> Path:
        where = hashlib.sha256(str(Path(sample.json_path or sample.image_path).resolve()).encode()).hexdigest()
        return self.dir / f"{sample.image_path.stem}-{where[:12]}.npz"

    @staticmethod
    def key(sample: Sample, shape: tuple[int, int], classes: Sequence[str], fixes: Fixes | None) -> str:
        if sample.json_path is None:
            raise TwostageError(f"{sample.image_path}: no annotation JSON (test image?)")
        h = hashlib.sha256()
        h.update(sha256_file(sample.json_path).encode())
        h.update(json.dumps([CACHE_FORMAT, list(shape), list(classes),
                             fixes.digest(sample) if fixes is not None else ""]).encode())
        return h.hexdigest()

    def get(self, sample: Sample, key: str) -> np.ndarray | None:
        """The cached (C, H, W) masks if present and made with `key`, else None."""
        path = self.path(sample)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    return None
                return _unpack_masks(z["shape"], z["boxes"], z["bits"])
        except Exception as e:  # noqa: BLE001 - any unreadable cache file is rebuilt, never fatal
            log.warning("%s: corrupt mask cache file, rebuilding (%s)", path, e)
            return None

    def put(self, sample: Sample, key: str, masks: np.ndarray) -> None:
        shape, boxes, bits = _pack_masks(masks)
        buf = io.BytesIO()
        np.savez(buf, key=np.array(key), shape=shape, boxes=boxes, bits=bits)
        write_bytes_atomic(self.path(sample), buf.getvalue())


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(C, 4) bounding box (y0, y1, x0, x1) of each class's non-zero pixels in (C, H, W)
    masks; all zero for an empty class. Bones cover a few % of an image: caches keep the boxes."""
    boxes = np.zeros((len(masks), 4), dtype=np.int64)
    for c, m in enumerate(masks):
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size:
            cols = np.flatnonzero(m[rows[0]:rows[-1] + 1].any(axis=0))
            boxes[c] = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
    return boxes


def _pack_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: bounding box (y0, y1, x0, x1) and the packed bits of that box."""
    boxes = mask_boxes(masks)
    parts = [np.packbits(m[y0:y1, x0:x1], axis=None) for m, (y0, y1, x0, x1) in zip(masks, boxes) if y1 > y0]
    bits = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return np.array(masks.shape, dtype=np.int64), boxes.astype(np.int32), bits


def _unpack_masks(shape: np.ndarray, boxes: np.ndarray, bits: np.ndarray) -> np.ndarray:
    masks = np.zeros(tuple(int(v) for v in shape), dtype=np.uint8)
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError("box table does not match the mask shape")
    offset = 0
    for c, (y0, y1, x0, x1) in enumerate(boxes):
        n = int((y1 - y0) * (x1 - x0))
        if n == 0:
            continue
        size = (n + 7) // 8
        if offset + size > bits.size:
            raise ValueError("bit stream too short")
        masks[c, y0:y1, x0:x1] = np.unpackbits(bits[offset:offset + size], count=n).reshape(y1 - y0, x1 - x0)
        offset += size
    return masks


def load_masks(sample: Sample, classes: Sequence[str] = CLASSES, fixes: Fixes | None = None,
               cache: MaskCache | None = None) -> np.ndarray:
    """(C, H, W) uint8 {0,1} masks of a training sample at its PNG size, fixes applied.

    With a `cache`, masks are read from disk when the JSON, the image size, this image's
    fixes and `classes` are unchanged, and rasterised (and stored) otherwise.
    """
    shape = png_size(sample.image_path)
    key = cache.key(sample, shape, classes, fixes) if cache is not None else ""
    if cache is not None:
        masks = cache.get(sample, key)
        if masks is not None:
            return masks
    masks = rasterize(load_annotations(sample, fixes), shape, classes)
    if cache is not None:
        cache.put(sample, key, masks)
    return masks
