"""The training-input cache: every training image decoded, rasterised and resized to its
working resolution once, then memory-mapped by every epoch and every run that asks for the
same inputs (docs/DESIGN.md §3, "Training input").

Why: decoding a 2048² PNG (or a ~3500² upscaled palm crop) and resizing 29 source-size
masks per item and per epoch kept a GPU 95 % idle. What remains per item is slicing a
memory map; augmentation runs batched on the training device (`augment.py`).

One cache is a folder named by its key (`cache_key`) under data.cache:

  images.u8   every item's canvas image (uint8, row-major), back to back
  masks.u8    every item's masks as per-class bounding-box slabs (uint8 0..255: the masks
              are resized like the image, so their edges are soft)
  index.npz   canvas shapes, image offsets, the slab table (N, C, 5: offset, y0, y1, x0, x1)
  meta.json   what the key was made of, counts and bytes; written last

A folder is built under a temporary name and renamed when complete, so a killed build
leaves no half cache, and two processes building the same key keep one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.annotations import rasterize
from ..data.fixes import Fixes, load_annotations
from ..data.layout import Sample
from ..data.masks import mask_boxes
from ..errors import TwostageError
from ..io.files import sha256_file, write_json_atomic
from ..io.images import read_image
from ..models import resize_images

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the canvas rule, the resize or the file layout changes


def default_cache_dir() -> Path:
    """$TWOSTAGE_CACHE, else $XDG_CACHE_HOME/twostage, else ~/.cache/twostage; caches go in its inputs/."""
    env = os.environ.get("TWOSTAGE_CACHE")
    if env:
        return Path(env) / "inputs"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "twostage" / "inputs"


@dataclass(frozen=True)
class CanvasSpec:
    """One cached item: a training sample and the (h, w) its image and masks are resized to."""

    sample: Sample
    shape: tuple[int, int]


def cache_key(specs: Sequence[CanvasSpec], classes: Sequence[str], fixes: Fixes | None) -> str:
    """What makes the cached arrays: every PNG (path, size, mtime), every JSON's content, the
    image's label fixes, the canvas sizes, the classes and the format."""
    h = hashlib.sha256(json.dumps([FORMAT, list(classes)]).encode())
    for s in specs:
        st = s.sample.image_path.stat()
        h.update(json.dumps([str(s.sample.image_path.resolve()), st.st_size, st.st_mtime_ns,
                             sha256_file(s.sample.json_path), fixes.digest(s.sample) if fixes else "",
                             list(s.shape)]).encode())
    return h.hexdigest()[:24]


def _slabs(masks: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(C, H, W) uint8 -> per class (y0, y1, x0, x1) of its non-zero pixels and that slab."""
    boxes = mask_boxes(masks)
    return boxes, [np.ascontiguousarray(m[y0:y1, x0:x1]).reshape(-1)
                   for m, (y0, y1, x0, x1) in zip(masks, boxes) if y1 > y0]


def to_canvas(image: np.ndarray, masks: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint8 image and (C, H, W) {0,1} masks -> `shape`, masks as soft uint8 0..255, by
    the one resize rule of model inputs (`models.resize_images`). One class at a time, so a
    2048² image with 29 classes never holds 29 float planes."""
    img = resize_images(torch.from_numpy(image)[None, None].float(), shape)[0, 0]
    out = np.zeros((len(masks),) + tuple(shape), dtype=np.uint8)
    for c, m in enumerate(masks):
        if m.any():
            plane = resize_images(torch.from_numpy(m)[None, None].float() * 255.0, shape)[0, 0]
            out[c] = plane.round().clamp(0, 255).to(torch.uint8).numpy()
    return img.round().clamp(0, 255).to(torch.uint8).numpy(), out


class _Builder(torch.utils.data.Dataset):
    """Decodes, rasterises and resizes one item (in DataLoader workers: the build runs on every core)."""

    def __init__(self, specs: Sequence[CanvasSpec], classes: Sequence[str], fixes: Fixes | None):
        self.specs, self.classes, self.fixes = list(specs), list(classes), fixes

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        s = self.specs[i]
        image = read_image(s.sample.image_path)
        masks = rasterize(load_annotations(s.sample, self.fixes), image.shape, self.classes)
        image, masks = to_canvas(image, masks, s.shape)
        boxes, parts = _slabs(masks)
        return image, boxes, parts


class InputCache:
    """The arrays of one built cache, memory-mapped (or read into memory with `in_memory`)."""

    def __init__(self, folder: Path, in_memory: bool = False):
        self.folder = folder
        index = np.load(folder / "index.npz")
        self.shapes = index["shapes"]  # (N, 2)
        self.image_offsets = index["image_offsets"]  # (N,)
        self.table = index["table"]  # (N, C, 5): offset, y0, y1, x0, x1
        read = (lambda p: np.fromfile(p, dtype=np.uint8)) if in_memory else (
            lambda p: np.memmap(p, dtype=np.uint8, mode="r") if p.stat().st_size else np.zeros(0, np.uint8))
        self.images, self.masks = read(folder / "images.u8"), read(folder / "masks.u8")

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return int(self.images.size + self.masks.size)

    def image(self, i: int) -> np.ndarray:
        """Item i's (h, w) canvas image (a view of the map)."""
        h, w = (int(v) for v in self.shapes[i])
        o = int(self.image_offsets[i])
        return self.images[o:o + h * w].reshape(h, w)

    def present(self, i: int) -> np.ndarray:
        """Indices of the classes item i has pixels of."""
        t = self.table[i]
        return np.flatnonzero(t[:, 2] > t[:, 1])

    def slab(self, i: int, c: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """Class c of item i: its box (y0, y1, x0, x1) on the canvas and the pixels inside it."""
        o, y0, y1, x0, x1 = (int(v) for v in self.table[i, c])
        return (y0, y1, x0, x1), self.masks[o:o + (y1 - y0) * (x1 - x0)].reshape(y1 - y0, x1 - x0)

    def region(self, i: int, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Item i inside canvas rows y0:y1, cols x0:x1 (may reach past the canvas: zeros there):
        the (y1-y0, x1-x0) image, and its masks kept sparse: the slab pixels back to back and a
        (C, 5) table (offset, y0, y1, x0, x1) relative to the region (empty: all zero)."""
        H, W = (int(v) for v in self.shapes[i])
        image = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
        if cy1 > cy0 and cx1 > cx0:
            image[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = self.image(i)[cy0:cy1, cx0:cx1]
        table = np.zeros((self.table.shape[1], 5), dtype=np.int64)
        parts, offset = [], 0
        for c in self.present(i):
            (sy0, sy1, sx0, sx1), pixels = self.slab(i, int(c))
            ty0, ty1, tx0, tx1 = max(sy0, y0), min(sy1, y1), max(sx0, x0), min(sx1, x1)
            if ty1 <= ty0 or tx1 <= tx0:
                continue
            part = pixels[ty0 - sy0:ty1 - sy0, tx0 - sx0:tx1 - sx0].reshape(-1)
            table[c] = (offset, ty0 - y0, ty1 - y0, tx0 - x0, tx1 - x0)
            parts.append(part)
            offset += part.size
        data = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
        return image, data, table

    def dense_masks(self, i: int) -> np.ndarray:
        """Item i's (C, h, w) masks, for checks and tests."""
        from .augment import densify

        h, w = (int(v) for v in self.shapes[i])
        _, data, table = self.region(i, 0, h, 0, w)
        out = torch.zeros((1, len(table), h, w), dtype=torch.uint8)
        densify(torch.from_numpy(data), torch.from_numpy(table)[None], out)
        return out[0].numpy()


def _fsync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def build_cache(folder: Path, specs: Sequence[CanvasSpec], classes: Sequence[str], fixes: Fixes | None,
                workers: int = 0, describe: dict | None = None, progress: bool = True) -> None:
    """Write the cache of `specs` to `folder` (built beside it, renamed when complete)."""
    from tqdm import tqdm

    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    t0 = time.time()
    n, C = len(specs), len(classes)
    shapes = np.array([s.shape for s in specs], dtype=np.int64).reshape(n, 2)
    image_offsets = np.zeros(n, dtype=np.int64)
    table = np.zeros((n, C, 5), dtype=np.int64)
    workers = min(workers, n // 4)  # a worker costs a process start: not worth it for a handful of images
    loader = torch.utils.data.DataLoader(_Builder(specs, classes, fixes), batch_size=None, num_workers=workers,
                                         collate_fn=lambda x: x)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fi, fm = open(tmp / "images.u8", "wb"), open(tmp / "masks.u8", "wb")
        io_, mo = 0, 0
        bar = tqdm(loader, total=n, desc="input cache", unit="image", disable=None if progress else True, leave=False)
        for i, (image, boxes, parts) in enumerate(bar):
            image_offsets[i] = io_
            fi.write(np.ascontiguousarray(image).tobytes())
            io_ += image.size
            for c, part in zip(np.flatnonzero(boxes[:, 1] > boxes[:, 0]), parts):
                table[i, c] = (mo, *boxes[c])
                fm.write(part.tobytes())
                mo += part.size
        _fsync_close(fi)
        _fsync_close(fm)
        np.savez(tmp / "index.npz", shapes=shapes, image_offsets=image_offsets, table=table)
        write_json_atomic(tmp / "meta.json", {"format": FORMAT, "items": n, "classes": list(classes),
                                              "image_bytes": io_, "mask_bytes": mo,
                                              "build_seconds": round(time.time() - t0, 1), **(describe or {})})
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not a concurrent builder's finished copy
                raise
    except OSError as e:
        raise TwostageError(f"{folder}: cannot write the training-input cache ({e.strerror or e}); set data.cache "
                            "to a folder with space") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_cache(root: Path, specs: Sequence[CanvasSpec], classes: Sequence[str], fixes: Fixes | None,
               workers: int = 0, in_memory: bool = False, describe: dict | None = None,
               build: bool = True) -> InputCache:
    """The cache of `specs` under `root`, built first if absent (or if an earlier build broke).
    With `build=False` a missing cache is an error (ranks that wait for another to build it)."""
    folder = root / cache_key(specs, classes, fixes)
    if not (folder / "meta.json").is_file():
        if not build:
            raise TwostageError(f"{folder}: training-input cache missing (the building rank failed?)")
        shutil.rmtree(folder, ignore_errors=True)
        log.info("building the training-input cache of %d images in %s", len(specs), folder)
        build_cache(folder, specs, classes, fixes, workers, describe)
    try:
        cache = InputCache(folder, in_memory)
    except (OSError, ValueError, KeyError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise TwostageError(f"{folder}: unreadable training-input cache ({e}); it was removed, run again") from None
    if len(cache) != len(specs) or cache.table.shape[1] != len(classes):
        raise TwostageError(f"{folder}: training-input cache does not match its key; delete the folder")
    log.info("training-input cache %s: %d images, %.0f MiB", folder, len(cache), cache.nbytes / 2**20)
    return cache
