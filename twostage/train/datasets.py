"""Training datasets and sampler: every random draw (order, augmentation, palm box jitter,
window) comes from generators seeded by (seed, epoch, item), so workers, ranks and resumes
do not change the batches.

An item is cut from the training-input cache (`inputs.py`: images and masks decoded and
resized once) and stays small: the image of its region, its masks as slabs, the rectangle
that becomes the network input and its augmentation draws. `augment.make_batch` makes the
pixels for the whole batch on the training device (docs/DESIGN.md §3, "Training input").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..box import Box, jitter_box
from ..config import StageConfig
from ..data.palm_set import read_item_manifest
from ..errors import TwostageError
from ..io.images import png_size
from ..models import input_hw
from .augment import IDENTITY, draw_params
from .inputs import CanvasSpec, InputCache, open_cache


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one item in one epoch: independent of workers, ranks and resumes."""
    return np.random.default_rng([seed, epoch, index])


def window_origin(shape: tuple[int, int], side: int, present: Sequence[int],
                  pixels: Callable[[int], tuple[np.ndarray, np.ndarray]], foreground: float,
                  rng: np.random.Generator) -> tuple[int, int]:
    """Top-left (y, x) of a `side`-pixel training window in an image of `shape`: with
    probability `foreground` centred on a random foreground pixel (`pixels(c)`: its rows and
    columns) of a random class in `present`, else uniform; always inside the image where it fits."""
    H, W = shape
    if rng.random() < foreground and len(present):
        ys, xs = pixels(int(rng.choice(present)))
        k = int(rng.integers(ys.size))
        return (int(np.clip(ys[k] - side // 2, 0, max(0, H - side))),
                int(np.clip(xs[k] - side // 2, 0, max(0, W - side))))
    return int(rng.integers(max(0, H - side) + 1)), int(rng.integers(max(0, W - side) + 1))


class StageDataset(torch.utils.data.Dataset):
    """Items of the network input size: the whole image (or palm box) resized, or with
    `data.patch` a random P×P window of the image at `data.patch_scale`. `attach_cache` must
    run first (it builds the cache where missing)."""

    def __init__(self, cfg: StageConfig, augment: bool):
        self.patch, self.patch_scale, self.foreground = cfg.data.patch, cfg.data.patch_scale, cfg.data.patch_foreground
        self.size = input_hw(cfg.model.input_size if self.patch is None else self.patch)
        self.seed = cfg.train.seed
        self.epoch = 0
        self.aug = cfg.aug if augment else None
        self.in_memory = cfg.data.preload
        self.cache: InputCache | None = None
        self.weights: list[float] | None = None  # per-item sampling weights (several sources), None: uniform
        self.valid: np.ndarray | None = None  # (N, C) 0 where an item's class is unlabelled, None: all labelled

    def canvas_specs(self) -> list[CanvasSpec]:
        """What each item's cached canvas is made from, and its size."""
        raise NotImplementedError

    def attach_cache(self, root: str | Path, workers: int = 0, build: bool = True) -> InputCache:
        """Open (or build, with `workers` processes) this dataset's training-input cache under `root`."""
        self.cache = open_cache(Path(root), self.canvas_specs(), self.classes, self.fixes, workers, self.in_memory,
                                describe={"stage": type(self).__name__, "input": list(self.size)}, build=build)
        return self.cache

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rect(self, index: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """The canvas region to read (y0, y1, x0, x1) and the network input's rectangle in it (y0, x0, h, w)."""
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """`key`: an index (in the epoch of `set_epoch`) or (epoch, index), as `EpochSampler` gives."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if self.cache is None:
            raise TwostageError("training dataset: no input cache attached (call attach_cache first)")
        rng = item_rng(self.seed, epoch, index)
        region, rect = self._rect(index, rng)
        image, data, table = self.cache.region(index, *region)
        params = IDENTITY if self.aug is None else draw_params(rng, self.aug)
        valid = np.ones(len(table), np.float32) if self.valid is None else self.valid[index]
        return {"image": image, "data": data, "table": table, "rect": rect, "params": params, "valid": valid}


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Items -> one batch: images zero-padded to the largest region, mask slabs back to back."""
    H = max(it["image"].shape[0] for it in items)
    W = max(it["image"].shape[1] for it in items)
    image = torch.zeros(len(items), H, W, dtype=torch.uint8)
    tables, base = [], 0
    for b, it in enumerate(items):
        h, w = it["image"].shape
        image[b, :h, :w] = torch.from_numpy(it["image"])
        t = it["table"].copy()
        t[:, 0] += base
        tables.append(t)
        base += it["data"].size
    return {"image": image,
            "size": torch.tensor([it["image"].shape for it in items], dtype=torch.int64),
            "data": torch.from_numpy(np.concatenate([it["data"] for it in items])),
            "table": torch.from_numpy(np.stack(tables)),
            "rect": torch.from_numpy(np.stack([np.asarray(it["rect"], np.float64) for it in items])),
            "params": torch.from_numpy(np.stack([it["params"] for it in items])),
            "valid": torch.from_numpy(np.stack([it["valid"] for it in items]))}


class GlobalDataset(StageDataset):
    """Whole images resized to the input size; with `data.patch` the canvas is the image at
    `data.patch_scale` and every item is a P×P window of it."""

    def __init__(self, cfg: StageConfig, samples: list, fixes, augment: bool,
                 weights: Sequence[float] | None = None, ignored: Sequence[Sequence[str]] | None = None):
        """`weights`: per-sample sampling weights (uniform if None or all equal); `ignored`: per
        sample, the classes without a label (dropped pseudo-labels), excluded from its loss."""
        super().__init__(cfg, augment)
        self.samples, self.classes, self.fixes = samples, cfg.classes, fixes
        if weights is not None and len(set(weights)) > 1:
            self.weights = [float(w) for w in weights]
        if ignored is not None and any(ignored):
            self.valid = np.array([[c not in set(names) for c in self.classes] for names in ignored], np.float32)

    def __len__(self) -> int:
        return len(self.samples)

    def canvas_specs(self) -> list[CanvasSpec]:
        if self.patch is None:
            return [CanvasSpec(s, self.size) for s in self.samples]
        return [CanvasSpec(s, tuple(max(1, round(v * self.patch_scale)) for v in png_size(s.image_path)))
                for s in self.samples]

    def _rect(self, index: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], np.ndarray]:
        H, W = (int(v) for v in self.cache.shapes[index])
        if self.patch is None:
            return (0, H, 0, W), np.array([0, 0, H, W], np.float64)

        def pixels(c: int) -> tuple[np.ndarray, np.ndarray]:
            (y0, _, x0, _), slab = self.cache.slab(index, c)
            ys, xs = np.nonzero(slab)
            return ys + y0, xs + x0

        side = self.patch
        y0, x0 = window_origin((H, W), side, self.cache.present(index), pixels, self.foreground, rng)
        return (y0, y0 + side, x0, x0 + side), np.array([0, 0, side, side], np.float64)


@dataclass
class PalmItem:
    """One palm training crop: the CONTEXT crop (upscaled) and the palm box inside it."""

    sample: Any  # data.Sample of the context crop in PALMDATA
    box: Any  # box.Box of the palm box relative to the context box, in source pixels
    context_side: int  # context box side in source pixels
    scale: int  # upscale factor of the crop
    source_box: Any  # palm box in source pixels
    source_shape: tuple[int, int]  # (H, W) of the source image


def load_palm_items(root: Path, samples: list) -> list[PalmItem]:
    """Pair every palm crop with its prepare-sr manifest (palm and context box in source pixels)."""
    items = []
    for s in samples:
        m = read_item_manifest(root, s)
        try:
            box, ctx = Box.from_dict(m["box"]), Box.from_dict(m["context_box"])
            scale = int(m["scale"])
            shape = tuple(int(v) for v in m["image_shape"][-2:])
        except (KeyError, TypeError, ValueError) as e:
            raise TwostageError(f"{root}: bad manifest for palm crop {s.rel} ({e}); re-run prepare-sr") from None
        items.append(PalmItem(s, box.relative_to(ctx), ctx.side, scale, box, shape))
    return items


class PalmDataset(StageDataset):
    """Palm crops: a (jittered) palm box of the upscaled context crop, at the input size. The
    canvas is the context crop resized so that the un-jittered box is the input size: a
    jittered box is resampled by at most its jitter scale, never from the source crop."""

    def __init__(self, cfg: StageConfig, items: list[PalmItem], fixes, augment: bool, jitter: bool):
        super().__init__(cfg, augment)
        self.items, self.classes, self.fixes = items, cfg.classes, fixes
        self.shift, self.scale = cfg.box.jitter_shift, cfg.box.jitter_scale
        self.jitter = jitter

    def __len__(self) -> int:
        return len(self.items)

    def canvas_specs(self) -> list[CanvasSpec]:
        specs = []
        for it in self.items:
            f = max(self.size) / (it.box.side * it.scale)
            specs.append(CanvasSpec(it.sample, tuple(max(1, round(v * f)) for v in png_size(it.sample.image_path))))
        return specs

    def _rect(self, index: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], np.ndarray]:
        item = self.items[index]
        box = item.box
        if self.jitter:
            box = jitter_box(box, rng, self.shift, self.scale, (item.context_side, item.context_side))
        H, W = (int(v) for v in self.cache.shapes[index])
        fy, fx = H / (item.context_side * item.scale), W / (item.context_side * item.scale)
        y0, x0 = box.y0 * item.scale * fy, box.x0 * item.scale * fx
        h, w = box.side * item.scale * fy, box.side * item.scale * fx
        Y0, X0 = max(0, math.floor(y0)), max(0, math.floor(x0))
        Y1, X1 = min(H, math.ceil(y0 + h)), min(W, math.ceil(x0 + w))
        return (Y0, Y1, X0, X1), np.array([y0 - Y0, x0 - X0, h, w], np.float64)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) from an inner sampler, so that persistent DataLoader workers, whose
    dataset copy never sees `set_epoch`, still draw each epoch's augmentation."""

    def __init__(self, inner: torch.utils.data.Sampler):
        self.inner, self.epoch = inner, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class SeededSampler(torch.utils.data.Sampler):
    """A fresh order per epoch from (seed, epoch): reproducible across resumes. Uniform: a
    permutation. With `weights`: n draws with replacement, each item as likely as its weight;
    under DDP every rank draws the same order and takes every world-th item from its rank."""

    def __init__(self, n: int, seed: int, weights: Sequence[float] | None = None, rank: int = 0, world: int = 1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.weights is None:
            return iter(torch.randperm(self.n, generator=g).tolist())
        order = torch.multinomial(self.weights, len(self) * self.world, replacement=True, generator=g)
        return iter(order[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.n if self.weights is None else math.ceil(self.n / self.world)
