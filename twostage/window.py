"""Sliding windows: the geometry of patch-trained checkpoints, the one sliding-window
inference and multi-scale test-time scales (docs/DESIGN.md §3, "Windows").

A patch-trained stage (`data.patch: P`, `data.patch_scale: s`) learned on P×P windows of the
image resized by s. Its checkpoint records `window: {size: [P, P], scale: s}`; `Predictor`
then predicts a whole image by resizing it by s and sliding P×P windows over it
(`sliding_window`, MONAI's `sliding_window_inference` with a Gaussian importance map), so its
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
    corners covered by one window). An outer product of two 1-D Gaussians: exact and cheap,
    where MONAI's own map convolves a delta image (seconds for a 1024 window)."""
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (n * SIGMA_SCALE)) ** 2))
    g = (axes[0][:, None] * axes[1][None, :]).clamp_(min=1e-6)
    return g.to(device=device, dtype=torch.float32)[None, None]


def sliding_window(x: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor], window: Sequence[int],
                   overlap: float = DEFAULT_OVERLAP, batch: int = WINDOW_BATCH,
                   out_device: str | torch.device | None = None) -> torch.Tensor:
    """(B, C_out, H, W) outputs of `predict` over (B, C_in, H, W) `x`, window by window.

    Windows of `window` (h, w) pixels (at most the image: a window never covers padding) step
    by (1 − overlap) of their side, the last one flush with the border; `batch` windows go
    through `predict` at once on `x`'s device; the outputs are blended with a Gaussian
    importance map and accumulated on `out_device` (default `x`'s device; "cpu" keeps a
    huge image's output off the GPU). Where one window covers the image, the result is
    `predict(x)` up to float rounding.
    """
    from monai.inferers import sliding_window_inference  # imported here: ~4 s, whole-image models skip it

    overlap = check_overlap(overlap)
    h, w = x.shape[-2:]
    roi = (min(int(window[0]), h), min(int(window[1]), w))
    out = torch.device(out_device) if out_device is not None else x.device
    return sliding_window_inference(x, roi, max(1, int(batch)), predict, overlap=overlap, mode="gaussian",
                                    sw_device=x.device, device=out,
                                    roi_weight_map=gaussian_map(roi, str(x.device)))
