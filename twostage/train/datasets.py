"""Training datasets and sampler: every random draw (order, augmentation, palm box jitter)
comes from generators seeded by (seed, epoch, item), so workers, ranks and resumes do not
change the batches."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..box import Box, crop_image, jitter_box
from ..config import StageConfig
from ..data import load_masks
from ..errors import TwostageError
from ..io import read_image
from ..models import input_hw, resize_images
from ..prepare import read_item_manifest


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one item in one epoch: independent of workers, ranks and resumes."""
    return np.random.default_rng([seed, epoch, index])


def build_augment(cfg: StageConfig):
    """The albumentations pipeline applied at input size to the uint8 image and masks (a list).

    Resizing to the input size and normalising are NOT here: they are the shared
    `models.resize_images` / `models.normalize` steps also used by `Predictor`.
    """
    import albumentations as A
    import cv2

    a = cfg.aug
    return A.Compose([
        A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=a.clahe),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=a.brightness),
        A.Affine(scale=(1 - a.scale, 1 + a.scale), translate_percent=(-a.shift, a.shift),
                 rotate=(-a.rotate, a.rotate), interpolation=cv2.INTER_LINEAR,
                 mask_interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, p=a.affine_p),
        A.HorizontalFlip(p=a.hflip),
    ])


def _to_input_size(image: np.ndarray, masks: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint8 image and (C, H, W) {0,1} masks -> input size, masks as soft uint8 0..255."""
    img = resize_images(torch.from_numpy(image)[None, None].float(), size)[0, 0]
    msk = resize_images(torch.from_numpy(masks)[None].float() * 255.0, size)[0]
    return (img.round().clamp(0, 255).to(torch.uint8).numpy(),
            msk.round().clamp(0, 255).to(torch.uint8).numpy())


def window_origin(shape: tuple[int, int], side: int, masks: np.ndarray, foreground: float,
                  rng: np.random.Generator) -> tuple[int, int]:
    """Top-left (y, x) of a `side`-pixel training window in an image of `shape`: with
    probability `foreground` centred on a random foreground pixel of a random class present in
    `masks` (C, H, W), else uniform; always inside the image where it fits."""
    H, W = shape
    if rng.random() < foreground:
        present = np.flatnonzero(masks.any(axis=(1, 2)))
        if present.size:
            ys, xs = np.nonzero(masks[int(rng.choice(present))])
            k = int(rng.integers(ys.size))
            return (int(np.clip(ys[k] - side // 2, 0, max(0, H - side))),
                    int(np.clip(xs[k] - side // 2, 0, max(0, W - side))))
    return int(rng.integers(max(0, H - side) + 1)), int(rng.integers(max(0, W - side) + 1))


def cut_window(array: np.ndarray, y0: int, x0: int, side: int) -> np.ndarray:
    """The (..., side, side) window of `array` at (y0, x0), zero-padded past the image border
    (only where the image is smaller than the window)."""
    part = array[..., y0:y0 + side, x0:x0 + side]
    if part.shape[-2:] == (side, side):
        return part
    out = np.zeros(array.shape[:-2] + (side, side), dtype=array.dtype)
    out[..., :part.shape[-2], :part.shape[-1]] = part
    return out


class _StageDataset(torch.utils.data.Dataset):
    """Items are (image uint8 (h, w), masks float (C, h, w) in 0..1) at the input size: the
    whole image (or palm box) resized, or with `data.patch` a random P×P window of it at
    `data.patch_scale` (`window_origin`, then the same augmentation)."""

    def __init__(self, cfg: StageConfig, augment: bool):
        self.patch, self.patch_scale, self.foreground = cfg.data.patch, cfg.data.patch_scale, cfg.data.patch_foreground
        self.size = input_hw(cfg.model.input_size if self.patch is None else self.patch)
        self.seed = cfg.train.seed
        self.epoch = 0
        self.augment = build_augment(cfg) if augment else None
        self.weights: list[float] | None = None  # per-item sampling weights (several sources), None: uniform
        self.valid: np.ndarray | None = None  # (N, C) 0 where an item's class is unlabelled, None: all labelled

    def _fit(self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Source-resolution (H, W) image and (C, H, W) masks -> the network input: resized
        whole, or a window of P / patch_scale source pixels resized to P×P."""
        if self.patch is None:
            return _to_input_size(image, masks, self.size)
        side = max(1, round(self.patch / self.patch_scale))
        y0, x0 = window_origin(image.shape[-2:], side, masks, self.foreground, rng)
        return _to_input_size(cut_window(image, y0, x0, side), cut_window(masks, y0, x0, side), self.size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _source(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, masks, valid): `valid` (C,) is 0 for classes this item has no label for."""
        rng = item_rng(self.seed, self.epoch, index)
        image, masks = self._source(index, rng)
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(2**31 - 1)))
            out = self.augment(image=image, masks=list(masks))
            image, masks = out["image"], np.stack(out["masks"])
        valid = torch.ones(len(masks)) if self.valid is None else torch.from_numpy(self.valid[index])
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(masks).float().div_(255.0), valid


class GlobalDataset(_StageDataset):
    """Whole images at the input size (resized once, optionally preloaded); with `data.patch`
    the preloaded images stay at the source size and every item is a window."""

    def __init__(self, cfg: StageConfig, samples: list, fixes, cache, augment: bool,
                 weights: Sequence[float] | None = None, ignored: Sequence[Sequence[str]] | None = None):
        """`weights`: per-sample sampling weights (uniform if None or all equal); `ignored`: per
        sample, the classes without a label (dropped pseudo-labels), excluded from its loss."""
        super().__init__(cfg, augment)
        self.samples, self.classes, self.fixes, self.cache = samples, cfg.classes, fixes, cache
        if weights is not None and len(set(weights)) > 1:
            self.weights = [float(w) for w in weights]
        if ignored is not None and any(ignored):
            self.valid = np.array([[c not in set(names) for c in self.classes] for names in ignored], np.float32)
        self.preloaded = None
        if cfg.data.preload:
            self.preloaded = [self._load(i) for i in range(len(samples))]

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[index]
        image, masks = read_image(s.image_path), load_masks(s, self.classes, self.fixes, self.cache)
        return (image, masks) if self.patch is not None else _to_input_size(image, masks, self.size)

    def _source(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, masks = self.preloaded[index] if self.preloaded is not None else self._load(index)
        return self._fit(image, masks, rng) if self.patch is not None else (image, masks)


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


class PalmDataset(_StageDataset):
    """Palm crops: a (jittered) palm box cut from the upscaled context crop, at the input size."""

    def __init__(self, cfg: StageConfig, items: list[PalmItem], fixes, cache, augment: bool, jitter: bool):
        super().__init__(cfg, augment)
        self.items, self.classes, self.fixes, self.cache = items, cfg.classes, fixes, cache
        self.shift, self.scale = cfg.box.jitter_shift, cfg.box.jitter_scale
        self.jitter = jitter
        self.preloaded = [self._load(i) for i in range(len(items))] if cfg.data.preload else None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.items[index].sample
        return read_image(s.image_path), load_masks(s, self.classes, self.fixes, self.cache)

    def _source(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        item = self.items[index]
        image, masks = self.preloaded[index] if self.preloaded is not None else self._load(index)
        box = item.box
        if self.jitter:
            box = jitter_box(box, rng, self.shift, self.scale, (item.context_side, item.context_side))
        return self._fit(crop_image(image, box, item.scale), crop_image(masks, box, item.scale), rng)


class _SeededSampler(torch.utils.data.Sampler):
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
