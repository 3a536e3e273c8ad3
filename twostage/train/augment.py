"""Training augmentation as batched torch ops on the training device (docs/DESIGN.md §3,
"Training input").

The random choices are drawn per item in the loader (`draw_params`, from the item's seeded
generator), so the batches do not depend on the worker count; the pixels are made here, for
the whole batch at once, on the GPU when training runs on one. One resampling does the
crop of the item's rectangle (the palm box, the window, the whole canvas), its resize to
the input size, the affine transform and the flip; then CLAHE and brightness/contrast on
the image. Outside the rectangle everything is 0, as with a constant-border warp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AugConfig
from .clahe import clahe

N_PARAMS = 10
"""clahe on, brightness/contrast on, contrast factor, brightness shift, affine on, angle (deg),
scale, shift x, shift y (fractions of the size), flip on."""

IDENTITY = np.array([0, 0, 1, 0, 0, 0, 1, 0, 0, 0], dtype=np.float64)

BRIGHTNESS_LIMIT = 0.15
CONTRAST_LIMIT = 0.15
CLAHE_CLIP = 2.0
CLAHE_TILES = (8, 8)


def draw_params(rng: np.random.Generator, aug: AugConfig) -> np.ndarray:
    """One item's augmentation: always the same number of draws, whatever is switched on."""
    u = rng.random(4)
    contrast, brightness = rng.uniform(-CONTRAST_LIMIT, CONTRAST_LIMIT), rng.uniform(-BRIGHTNESS_LIMIT, BRIGHTNESS_LIMIT)
    angle = rng.uniform(-aug.rotate, aug.rotate)
    scale = rng.uniform(1 - aug.scale, 1 + aug.scale)
    tx, ty = rng.uniform(-aug.shift, aug.shift, size=2)
    return np.array([u[0] < aug.clahe, u[1] < aug.brightness, 1 + contrast, brightness, u[2] < aug.affine_p,
                     angle, scale, tx, ty, u[3] < aug.hflip], dtype=np.float64)


def _theta(rect: np.ndarray, region: tuple[int, int], out: tuple[int, int], p: np.ndarray) -> np.ndarray:
    """The 2x3 `affine_grid` matrix (normalised output -> normalised input coordinates, pixel
    centres at i + 0.5) of: flip, the inverse affine about the centre, then the output square
    onto `rect` = (y0, x0, h, w) of a padded input of size `region`."""
    H, W = out
    to_px = np.array([[W / 2, 0, W / 2], [0, H / 2, H / 2], [0, 0, 1]])  # normalised output -> pixels
    m = to_px
    if p[9]:
        m = np.array([[-1, 0, W], [0, 1, 0], [0, 0, 1]]) @ m
    if p[4]:
        a, s = math.radians(p[5]), p[6]
        fwd = np.array([[s * math.cos(a), s * math.sin(a), 0], [-s * math.sin(a), s * math.cos(a), 0], [0, 0, 1]])
        # forward: v' = fwd (v - c) + c + t about the centre c; the grid needs its inverse
        centre = np.array([[1, 0, W / 2], [0, 1, H / 2], [0, 0, 1]])
        moved = np.array([[1, 0, W / 2 + p[7] * W], [0, 1, H / 2 + p[8] * H], [0, 0, 1]])
        m = centre @ np.linalg.inv(fwd) @ np.linalg.inv(moved) @ m  # out pixel -> pre-affine pixel
    y0, x0, h, w = rect
    m = np.array([[w / W, 0, x0], [0, h / H, y0], [0, 0, 1]]) @ m  # onto the rectangle
    Hr, Wr = region
    m = np.array([[2 / Wr, 0, -1], [0, 2 / Hr, -1], [0, 0, 1]]) @ m  # pixels -> normalised input
    return m[:2]


def densify(data: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    """Write sparse batch masks (`collate` of `InputCache.region` items) into `out` (B, C, h, w),
    zeros, on its device: grey levels 0..255 in its dtype."""
    data = data.to(out.device, non_blocking=True)
    for b, c in torch.nonzero(table[:, :, 2] > table[:, :, 1]).tolist():
        o, y0, y1, x0, x1 = table[b, c].tolist()
        out[b, c, y0:y1, x0:x1] = data[o:o + (y1 - y0) * (x1 - x0)].view(y1 - y0, x1 - x0)


@dataclass
class Batch:
    """A training batch on the device: images (B, H, W) float grey levels 0..255 (integers),
    masks (B, C, H, W) float 0..1, valid (B, C)."""

    images: torch.Tensor
    masks: torch.Tensor
    valid: torch.Tensor


def _is_copy(rect: np.ndarray, region: tuple[int, int], out: tuple[int, int], p: np.ndarray) -> bool:
    """Whether an item's input is its region as it is (or mirrored): no resampling needed."""
    return not p[4] and tuple(region) == tuple(out) and tuple(rect) == (0, 0, *out)


def make_batch(batch: dict, out: tuple[int, int], device: torch.device) -> Batch:
    """The network-size training batch of a collated loader batch: crop, resize and augment on `device`."""
    images = batch["image"].to(device, non_blocking=True)
    B, Hr, Wr = images.shape
    C = batch["table"].shape[1]
    # channels: image, inside-the-region, the masks (0..255; scaled to 0..1 after resampling)
    x = torch.zeros(B, C + 2, Hr, Wr, device=device)
    x[:, 0] = images
    for b, (h, w) in enumerate(batch["size"].tolist()):
        x[b, 1, :h, :w] = 1
    densify(batch["data"], batch["table"], x[:, 2:])
    params, rects = batch["params"].numpy(), batch["rect"].numpy()
    warp = [b for b in range(B) if not _is_copy(rects[b], (Hr, Wr), out, params[b])]
    if warp:
        # small host tensors go over with non_blocking: a blocking copy would wait for the queued GPU work
        theta = torch.from_numpy(np.stack([_theta(rects[b], (Hr, Wr), out, params[b]) for b in warp]))
        theta = theta.float().to(device, non_blocking=True)
        grid = F.affine_grid(theta, [len(warp), 1, *out], align_corners=False)
        sampled = F.grid_sample(x if len(warp) == B else x[warp], grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
    if len(warp) == B:
        y = sampled
    else:  # plain copies (and flips) are exact, and cheaper than resampling
        y = torch.empty(B, C + 2, *out, device=device)
        for k, b in enumerate(warp):
            y[b] = sampled[k]
        for b in set(range(B)) - set(warp):
            y[b] = x[b].flip(-1) if params[b, 9] else x[b]
    del x
    image, cover, masks = y[:, 0].round().clamp_(0, 255), y[:, 1], y[:, 2:].div_(255.0).clamp_(0, 1)
    image = photometric(image, cover, params)
    return Batch(image, masks, batch["valid"].to(device, non_blocking=True))


def photometric(image: torch.Tensor, cover: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """CLAHE then brightness/contrast on the items that drew them; 0 stays 0 outside the image."""
    sel = np.flatnonzero(params[:, 0])
    if sel.size:
        idx = torch.from_numpy(sel).to(image.device, non_blocking=True)
        # whole-pixel weights: exact histogram counts (and the same on CUDA, whose float atomics are not)
        image[idx] = clahe(image[idx], CLAHE_CLIP, CLAHE_TILES, weight=(cover[idx] > 0.5).float()).round_()
    sel = np.flatnonzero(params[:, 1])
    if sel.size:
        idx = torch.from_numpy(sel).to(image.device, non_blocking=True)
        alpha = torch.from_numpy(params[sel, 2]).to(image.device, image.dtype, non_blocking=True).view(-1, 1, 1)
        beta = torch.from_numpy(params[sel, 3] * 255.0).to(image.device, image.dtype, non_blocking=True).view(-1, 1, 1)
        image[idx] = (image[idx] * alpha + beta).clamp_(0, 255).round_()
    return image.masked_fill_(cover <= 0, 0)
