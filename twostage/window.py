"""Sliding windows: the geometry of patch-trained checkpoints, the one sliding-window
inference and multi-scale test-time scales (docs/DESIGN.md §3, "Windows").

A patch-trained stage (`data.patch: P`, `data.patch_scale: s`) learned on P×P windows of the
image resized by s. Its checkpoint records `window: {size: [P, P], scale: s}`; `Predictor`
then predicts a whole image by resizing it by s and sliding P×P windows over it
(`sliding_window`, Gaussian importance blending), so its
probabilities come out at the working size (H·s, W·s) instead of the network's input size.
Everything downstream (box, fusion, thresholds, RLE) takes probabilities at any size.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import TwostageError

DEFAULT_OVERLAP = 0.5
"""Fraction of a window shared with its neighbour (0.5: stride = half the window, nnU-Net's)."""

SIGMA_SCALE = 0.125
"""Gaussian importance sigma as a fraction of the window side (nnU-Net's and MONAI's 1/8)."""

MIN_SCALE, MAX_SCALE = 0.05, 4.0
"""Accepted range of an image scale (`data.patch_scale`, `--scales`)."""

MIN_WINDOW = 16
"""Smallest window side in pixels."""

WINDOW_BATCH = 4
"""Windows per forward pass (on the model's device)."""


def check_scale(value: float, what: str) -> float:
    """`value` as a float if it is a usable image scale, else a one-line TwostageError."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise TwostageError(f"{what}={value!r}: not a number") from None
    if not (math.isfinite(s) and MIN_SCALE <= s <= MAX_SCALE):
        raise TwostageError(f"{what}={value!r}: must be between {MIN_SCALE} and {MAX_SCALE}")
    return s


def check_overlap(value: float) -> float:
    """The window overlap as a float in [0, 1), else a one-line TwostageError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TwostageError(f"--overlap {value!r}: not a number") from None
    if not (math.isfinite(v) and 0 <= v < 1):
        raise TwostageError(f"--overlap {value!r}: must be at least 0 and below 1 (0.5: windows overlap by half)")
    return v


def parse_scales(value: str | float | Sequence[float] | None) -> tuple[float, ...]:
    """`--scales 0.75,1.0,1.25` (a comma list, a number or a sequence) as a tuple of scales."""
    if value is None:
        return (1.0,)
    items = [v for v in value.split(",")] if isinstance(value, str) else \
        [value] if isinstance(value, (int, float)) else list(value)
    items = [v.strip() if isinstance(v, str) else v for v in items]
    if not items or any(v == "" for v in items):
        raise TwostageError(f"--scales {value!r}: give a comma-separated list of scales, e.g. 0.75,1.0,1.25")
    scales = tuple(check_scale(v, "--scales") for v in items)
    if len(set(scales)) != len(scales):
        raise TwostageError(f"--scales {value!r}: a scale is listed twice")
    return scales


@dataclass(frozen=True)
class Window:
    """The window a patch-trained checkpoint learned on: `size` (h, w) pixels of the image
    resized by `scale`."""

    size: tuple[int, int]
    scale: float

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < MIN_WINDOW
                                      for v in self.size):
            raise TwostageError(f"window size {self.size!r}: two whole numbers of pixels, each >= {MIN_WINDOW}")
        if isinstance(self.scale, bool):
            raise TwostageError(f"window scale {self.scale!r}: not a number")
        object.__setattr__(self, "scale", check_scale(self.scale, "window scale"))

    @classmethod
    def from_meta(cls, meta: dict) -> "Window | None":
        """The window of a checkpoint meta (None: a whole-image model)."""
        w = meta.get("window")
        if w is None:
            return None
        if not isinstance(w, dict) or not isinstance(w.get("size"), list):
            raise TwostageError("window must be a mapping {size: [h, w], scale: s}")
        return cls(tuple(w["size"]), w.get("scale"))

    def to_dict(self) -> dict:
        return {"size": list(self.size), "scale": self.scale}

    def working_shape(self, shape: Sequence[int], scale: float = 1.0) -> tuple[int, int]:
        """(h, w) of an image of `shape` (H, W) resized by this window's scale times `scale`."""
        f = self.scale * scale
        return (max(1, round(int(shape[0]) * f)), max(1, round(int(shape[1]) * f)))


@functools.lru_cache(maxsize=8)
def gaussian_map(size: tuple[int, int], device: str) -> torch.Tensor:
    """(1, 1, h, w) float32 Gaussian importance of a window: 1 at the centre, sigma = side/8,
    floored at 1e-6 so every pixel of a window counts a little (no zero division at image
    corners covered by one window). An outer product of two 1-D Gaussians: exact and cheap
    (MONAI's map convolves a delta image: seconds for a 1024 window)."""
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (n * SIGMA_SCALE)) ** 2))
    g = (axes[0][:, None] * axes[1][None, :]).clamp_(min=1e-6)
    return g.to(device=device, dtype=torch.float32)[None, None]


def window_starts(n: int, side: int, overlap: float) -> list[int]:
    """Origins of `side`-pixel windows along an axis of `n` pixels: stride (1 − overlap)·side,
    the last window flush with the end (MONAI's and nnU-Net's placement); one window if it
    covers the axis."""
    if n <= side:
        return [0]
    stride = max(1, int(side * (1 - overlap)))
    return sorted({min(i * stride, n - side) for i in range(math.ceil((n - side) / stride) + 1)})


def sliding_window(x: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor], window: Sequence[int],
                   overlap: float = DEFAULT_OVERLAP, batch: int = WINDOW_BATCH,
                   out_device: str | torch.device | None = None) -> torch.Tensor:
    """(B, C_out, H, W) outputs of `predict` over (B, C_in, H, W) `x`, window by window.

    Windows of `window` (h, w) pixels (at most the image: a window never covers padding) are
    placed by `window_starts`; `batch` windows go through `predict` at once on `x`'s device,
    are weighted there by the Gaussian importance map (in place) and added into the output on
    `out_device` (default `x`'s device; "cpu" keeps a huge image's output off the GPU). The
    weights' sum is one (H, W) map, divided out once at the end: the blending touches the
    C-channel output twice per window and once more in all, nothing else (benchmarks/window.py
    measures it against the forwards alone and MONAI's `sliding_window_inference`). Where one
    window covers the image, the result is `predict(x)` up to float rounding.
    """
    overlap = check_overlap(overlap)
    b, h, w = x.shape[0], *x.shape[-2:]
    wh, ww = min(int(window[0]), h), min(int(window[1]), w)
    out_device = torch.device(out_device) if out_device is not None else x.device
    g = gaussian_map((wh, ww), str(x.device))
    origins = [(i, j) for i in window_starts(h, wh, overlap) for j in window_starts(w, ww, overlap)]
    out = None
    for k in range(0, len(origins), max(1, int(batch))):
        chunk = origins[k:k + max(1, int(batch))]
        y = predict(torch.cat([x[..., i:i + wh, j:j + ww] for i, j in chunk]))
        if y.shape[0] != b * len(chunk) or y.shape[-2:] != (wh, ww):
            raise TwostageError(f"sliding window: the predictor turned {len(chunk) * b} windows of {wh}x{ww} "
                                f"into an output of shape {tuple(y.shape)}")
        y = y.float().mul_(g).to(out_device)
        if out is None:
            out = torch.zeros((b, y.shape[1], h, w), dtype=torch.float32, device=out_device)
        for n, (i, j) in enumerate(chunk):
            out[..., i:i + wh, j:j + ww] += y[n * b:(n + 1) * b]
    total = torch.zeros((h, w), dtype=torch.float32, device=out_device)
    g2 = g[0, 0].to(out_device)
    for i, j in origins:
        total[i:i + wh, j:j + ww] += g2
    return out.div_(total)
