"""The palm box: the one place of the box rule and its forward/inverse coordinate mapping.

Training derives the box from the carpal polygons, inference from the global model's
predicted carpal pixels, with the SAME rule (`BoxRule`): the carpal extent, made square,
grown by `margin` (a fraction of the side, on each side), clamped to the side range seen in
training, shifted inside the image (`BoxRule.square`, the one place of that step). Crops of
a box, also of an upscaled crop, are cut by `crop_image`; polygons are mapped by
`points_to_crop` / `polygon_to_crop`. Fusion and the sparse upsample read a box's x0, y0
and side as they are (source pixels).

Conventions:
  * A `Box` is a square in source pixel coordinates: columns x0 .. x0+side-1, rows
    y0 .. y0+side-1. It always lies inside its image (side <= min(H, W)).
  * Pixel i covers [i, i+1) with its centre at i + 0.5 in "edge" coordinates; point and
    polygon coordinates are pixel indices (a vertex at x means the centre of column x).
  * A crop upscaled by `scale` maps source coordinate x to crop coordinate
    (x - x0 + 0.5) * scale - 0.5: pixel centres line up with cv2.resize / F.interpolate
    (align_corners=False), so masks and polygons stay aligned after resizing.
  * Normalised boxes are (cx / W, cy / H, side / min(H, W)), centres in edge coordinates.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .classes import PALM_CLASSES
from .errors import TwostageError

log = logging.getLogger(__name__)

DEFAULT_SIDE = 0.35
"""Side (fraction of min(H, W)) of the centred last-resort box used when there is neither
a predicted carpal pixel nor a fallback box in the rule."""


def _hw(image_shape: Sequence[int]) -> tuple[int, int]:
    h, w = int(image_shape[-2]), int(image_shape[-1])
    if h <= 0 or w <= 0:
        raise TwostageError(f"image shape {tuple(image_shape)}: height and width must be positive")
    return h, w


@dataclass(frozen=True)
class Box:
    """A square crop in source pixel coordinates; always inside its image."""

    x0: int
    y0: int
    side: int

    @property
    def x1(self) -> int:
        """One past the last column."""
        return self.x0 + self.side

    @property
    def y1(self) -> int:
        """One past the last row."""
        return self.y0 + self.side

    @property
    def center(self) -> tuple[float, float]:
        """(cx, cy) in edge coordinates."""
        return self.x0 + self.side / 2, self.y0 + self.side / 2

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, cols) slices: `array[..., rows, cols]` is the crop."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @classmethod
    def around(cls, cx: float, cy: float, side: float, image_shape: Sequence[int]) -> "Box":
        """The square of `side` centred at (cx, cy), side cut to min(H, W), shifted inside the image."""
        h, w = _hw(image_shape)
        if not (math.isfinite(cx) and math.isfinite(cy) and math.isfinite(side)):
            raise TwostageError(f"box centre/side must be finite, got ({cx}, {cy}, {side})")
        s = int(min(max(round(side), 1), min(h, w)))
        x0 = math.floor(cx - s / 2 + 0.5)
        y0 = math.floor(cy - s / 2 + 0.5)
        return cls(min(max(x0, 0), w - s), min(max(y0, 0), h - s), s)

    def grown(self, factor: float, image_shape: Sequence[int]) -> "Box":
        """The box `factor` times larger around the same centre (e.g. the context crop), inside the image."""
        cx, cy = self.center
        return Box.around(cx, cy, self.side * factor, image_shape)

    def relative_to(self, outer: "Box") -> "Box":
        """This box in the coordinates of `outer`'s crop (source pixels, origin at outer's corner)."""
        return Box(self.x0 - outer.x0, self.y0 - outer.y0, self.side)

    def normalized(self, image_shape: Sequence[int]) -> tuple[float, float, float]:
        """(cx / W, cy / H, side / min(H, W))."""
        h, w = _hw(image_shape)
        cx, cy = self.center
        return cx / w, cy / h, self.side / min(h, w)

    def to_dict(self) -> dict:
        return {"x0": self.x0, "y0": self.y0, "side": self.side}

    @classmethod
    def from_dict(cls, d: dict) -> "Box":
        try:
            return cls(int(d["x0"]), int(d["y0"]), int(d["side"]))
        except (KeyError, TypeError, ValueError):
            raise TwostageError(f"box {d!r}: expected {{x0, y0, side}} integers") from None


DEFAULT_MARGIN = 0.08
"""Box margin per side, a fraction of the carpal extent. The global model's boxes are off by
at most ~0.04 of the side (centre) and ~0.09 (side) on the phantom variants (`calibrate`
reports it): 0.08 covers that, and a tighter box gives the carpals more of the palm input
(0.15 before; 0.08 with jitter 0.05/0.1 raised the held-out carpal gain, docs/results.md)."""


@dataclass(frozen=True)
class BoxRule:
    """How a palm box is derived; stored with the palm set and the palm checkpoint.

    margin: fraction of the carpal extent added on EACH side (side = extent * (1 + 2 margin)).
    side_min, side_max: allowed side as a fraction of min(H, W) (None: unbounded); set from
        the sides seen in training so a bad prediction cannot produce an absurd box.
    fallback: normalised (cx, cy, side) used when no carpal pixel is predicted (None: a
        centred box of DEFAULT_SIDE).
    """

    margin: float = DEFAULT_MARGIN
    side_min: float | None = None
    side_max: float | None = None
    fallback: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.margin, (int, float)) and 0 <= self.margin <= 2):
            raise TwostageError(f"box margin {self.margin!r}: must be a number in [0, 2]")
        for name in ("side_min", "side_max"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise TwostageError(f"box {name} {v!r}: must be a fraction in (0, 1] or null")
        if self.side_min is not None and self.side_max is not None and self.side_min > self.side_max:
            raise TwostageError(f"box side_min {self.side_min} > side_max {self.side_max}")
        if self.fallback is not None:
            try:
                fb = tuple(float(v) for v in self.fallback)
            except (TypeError, ValueError, OverflowError):
                fb = ()
            if len(fb) != 3 or not all(math.isfinite(v) and v > 0 for v in fb):
                raise TwostageError(f"box fallback {self.fallback!r}: expected positive normalised (cx, cy, side)")
            object.__setattr__(self, "fallback", fb)

    def clamp_side(self, side: float, image_shape: Sequence[int]) -> float:
        """`side` (px) clamped to [side_min, side_max] * min(H, W)."""
        base = min(_hw(image_shape))
        if self.side_min is not None:
            side = max(side, self.side_min * base)
        if self.side_max is not None:
            side = min(side, self.side_max * base)
        return side

    def square(self, x0: float, x1: float, y0: float, y1: float, image_shape: Sequence[int]) -> Box:
        """THE box rule: the extent [x0, x1) × [y0, y1) (edge coordinates), made square, grown by
        the margin on each side, clamped to the side range, shifted inside the image."""
        extent = max(x1 - x0, y1 - y0)
        side = self.clamp_side(math.ceil(extent * (1 + 2 * self.margin)), image_shape)
        return Box.around((x0 + x1) / 2, (y0 + y1) / 2, side, image_shape)

    def to_dict(self) -> dict:
        return {"margin": float(self.margin), "side_min": self.side_min, "side_max": self.side_max,
                "fallback": list(self.fallback) if self.fallback is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> "BoxRule":
        if not isinstance(d, dict):
            raise TwostageError(f"box rule {d!r}: expected a mapping")
        unknown = set(d) - {"margin", "side_min", "side_max", "fallback"}
        if unknown:
            raise TwostageError(f"box rule: unknown key(s) {sorted(map(str, unknown))}; "
                                "valid: margin, side_min, side_max, fallback")
        fb = d.get("fallback")
        return cls(margin=d.get("margin", DEFAULT_MARGIN), side_min=d.get("side_min"), side_max=d.get("side_max"),
                   fallback=tuple(fb) if isinstance(fb, (list, tuple)) else fb)


# ----------------------------------------------------------------------------- training


def box_from_points(points: np.ndarray, image_shape: Sequence[int], rule: BoxRule) -> Box:
    """The training box of a set of (N, 2) x,y points: min/max extent, square, grown, inside the image.

    Every point inside the image lies inside the returned box (unless the side range or the
    image size forbids a box that large).
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        raise TwostageError("box_from_points: no points")
    h, w = _hw(image_shape)
    pts = np.clip(pts, 0, [w - 1, h - 1])
    (xmin, ymin), (xmax, ymax) = pts.min(0), pts.max(0)
    return rule.square(xmin, xmax + 1, ymin, ymax + 1, (h, w))  # pixels covered, inclusive


def box_from_annotations(annotations: Iterable, image_shape: Sequence[int], rule: BoxRule,
                         classes: Sequence[str] = PALM_CLASSES) -> Box | None:
    """The training box from all points of the carpal annotations; None if the image has none."""
    pts = [np.asarray(a.points).reshape(-1, 2) for a in annotations if a.label in classes and len(a.points)]
    if not pts:
        return None
    return box_from_points(np.concatenate(pts), image_shape, rule)


def fallback_from_boxes(boxes: Sequence[Box], shapes: Sequence[Sequence[int]]) -> tuple[float, float, float]:
    """Mean normalised (cx, cy, side) of training boxes: the box used when nothing is predicted."""
    if not boxes:
        raise TwostageError("fallback_from_boxes: no boxes")
    n = np.array([b.normalized(s) for b, s in zip(boxes, shapes)], dtype=np.float64)
    return tuple(float(v) for v in n.mean(0))


def side_range_from_boxes(boxes: Sequence[Box], shapes: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(min, max) normalised side of training boxes: the clamp range for predicted boxes."""
    if not boxes:
        raise TwostageError("side_range_from_boxes: no boxes")
    sides = [b.normalized(s)[2] for b, s in zip(boxes, shapes)]
    return float(min(sides)), float(max(sides))


def palm_input_warning(native_sides: Sequence[float], input_size: int | Sequence[int]) -> str | None:
    """A warning when the palm network's input is smaller than the typical native box side.

    The palm crop is resized from (box side × SR scale) to the input size: below the native
    side the super-resolution, and even native detail, is thrown away. Returns None when the
    input is at least the median native side.
    """
    sides = np.asarray([float(s) for s in native_sides], dtype=np.float64)
    if sides.size == 0:
        return None
    side_in = min(int(v) for v in ([input_size] * 2 if isinstance(input_size, int) else input_size))
    median = float(np.median(sides))
    if side_in >= median:
        return None
    share = float((sides > side_in).mean())
    return (f"palm input {side_in} px is smaller than the native palm box side (median {median:.0f} px, "
            f"range {sides.min():.0f}-{sides.max():.0f} px; {share:.0%} of {sides.size} boxes larger): the "
            f"upscaled crop is downsampled below native resolution and the super-resolution is lost; "
            f"set the palm stage's model.input_size to at least {2 * math.ceil(median / 32) * 32} (2x the box)")


def jitter_box(box: Box, rng: np.random.Generator, shift: float = 0.1, scale: float = 0.15,
               image_shape: Sequence[int] | None = None) -> Box:
    """A randomly shifted (± shift·side per axis) and resized (side × [1-scale, 1+scale]) box.

    Trains the palm model on the box errors it will see from predicted boxes at test time.
    """
    if image_shape is None:
        raise TwostageError("jitter_box: image_shape is required to keep the box inside the image")
    cx, cy = box.center
    dx, dy = rng.uniform(-shift, shift, size=2) * box.side
    side = box.side * (1 + rng.uniform(-scale, scale))
    return Box.around(cx + dx, cy + dy, side, image_shape)


def box_error(predicted: Box, true: Box) -> tuple[float, float]:
    """(centre shift, side change) of a predicted box against the true one, in the units
    `jitter_box` draws them: the larger per-axis centre offset and |side ratio - 1|, both as
    fractions of the true side. `calibrate` reports them so the training jitter can be set
    to cover the global model's real box errors and no more."""
    (px, py), (tx, ty) = predicted.center, true.center
    return max(abs(px - tx), abs(py - ty)) / true.side, abs(predicted.side / true.side - 1.0)


# ---------------------------------------------------------------------------- inference

_CORE_Q = (0.1, 0.9)
"""Quantiles of the predicted carpal pixels that measure the core spread R."""
_WINDOW = 1.5
"""Pixels farther than _WINDOW * R from the median (per axis) are ignored as outliers."""


def extent_rule() -> dict:
    """How `boxes_from_probs` measures the carpal extent, as data (written into an exported
    chain's chain.yaml for runtimes that reimplement it)."""
    from .fusion import DEFAULT_THRESHOLD

    return {"carpal_pixel": f"any palm class p > {DEFAULT_THRESHOLD}", "centre": "per-axis median",
            "core_quantiles": list(_CORE_Q), "outlier_window": _WINDOW,
            "extent": "min/max of the kept pixels, scaled to the source size, then BoxRule.square"}


def _quantile_index(hist, qs: Sequence[float]):
    """Per-row index where the cumulative histogram first reaches each quantile. hist: (B, L) -> (B, len(qs))."""
    import torch

    cdf = hist.cumsum(1)
    total = cdf[:, -1:].clamp_min(1)
    q = torch.tensor(qs, dtype=cdf.dtype, device=cdf.device)
    return (cdf.unsqueeze(1) < q.view(1, -1, 1) * total.unsqueeze(1)).sum(2)


def boxes_from_probs(carpal_probs, rule: BoxRule, names: Sequence[str] | None = None,
                     image_shape: Sequence[int] | None = None) -> list[Box]:
    """Palm boxes from predicted carpal probabilities, on their device, by the training rule.

    Robust: the median of the predicted carpal pixels anchors the box; pixels farther than
    1.5x the core spread (10-90 % quantile range) from it are ignored; the remaining pixels'
    min/max extent goes through `BoxRule.square`, as in `box_from_points`. A carpal pixel is
    one above fusion.DEFAULT_THRESHOLD (the masks' comparison, `fusion.binarize`). An image with
    no carpal pixel gets the rule's fallback box (or a centred DEFAULT_SIDE box) and a warning
    naming it.

    Args:
        carpal_probs: (B, K, h, w) torch probabilities (K carpal channels, e.g. 8), any device.
        rule: the palm set's BoxRule.
        names: image names for the warnings.
        image_shape: (H, W) of the source images if the probabilities are at another size.
    Returns:
        B boxes in source pixel coordinates.
    """
    import torch

    from .fusion import DEFAULT_THRESHOLD, binarize

    if carpal_probs.ndim != 4:
        raise TwostageError(f"boxes_from_probs: expected (B, K, H, W) probabilities, got shape {tuple(carpal_probs.shape)}")
    b, _, h, w = carpal_probs.shape
    H, W = _hw(image_shape) if image_shape is not None else (h, w)
    sx, sy = W / w, H / h
    with torch.no_grad():
        thr = torch.full((carpal_probs.shape[1],), DEFAULT_THRESHOLD)  # fixed: calibrated thresholds never move the box
        mask = binarize(carpal_probs, thr).any(1)  # (B, h, w): the masks' comparison, p > t
        count = mask.flatten(1).sum(1)
        cols, rows = mask.sum(1).float(), mask.sum(2).float()  # (B, w), (B, h)
        qx = _quantile_index(cols, (0.5, *_CORE_Q)).float()
        qy = _quantile_index(rows, (0.5, *_CORE_Q)).float()
        mx, my = qx[:, 0], qy[:, 0]
        r = torch.maximum(qx[:, 2] - qx[:, 1], qy[:, 2] - qy[:, 1]).clamp_min(1) * _WINDOW
        xs = torch.arange(w, device=mask.device, dtype=torch.float32)
        ys = torch.arange(h, device=mask.device, dtype=torch.float32)
        keep_x = (xs.view(1, -1) - mx.view(-1, 1)).abs() <= r.view(-1, 1)  # (B, w)
        keep_y = (ys.view(1, -1) - my.view(-1, 1)).abs() <= r.view(-1, 1)  # (B, h)
        inner = mask & keep_y.unsqueeze(2) & keep_x.unsqueeze(1)
        big = torch.tensor(1e9, device=mask.device)
        any_x, any_y = inner.any(1), inner.any(2)  # (B, w), (B, h)
        x0 = torch.where(any_x, xs, big).amin(1)
        x1 = torch.where(any_x, xs, -big).amax(1)
        y0 = torch.where(any_y, ys, big).amin(1)
        y1 = torch.where(any_y, ys, -big).amax(1)
        stats = torch.stack([count.float(), x0, x1, y0, y1], 1).cpu().numpy()  # the only transfer
    boxes = []
    for i, (n, ax0, ax1, ay0, ay1) in enumerate(stats):
        if n == 0:
            boxes.append(_fallback_box(rule, (H, W), names[i] if names is not None else f"image {i}"))
            continue
        # extent in source pixels: the predicted pixel span scaled to the source size
        boxes.append(rule.square(ax0 * sx, (ax1 + 1) * sx, ay0 * sy, (ay1 + 1) * sy, (H, W)))
    return boxes


def _fallback_box(rule: BoxRule, image_shape: tuple[int, int], name: str) -> Box:
    h, w = image_shape
    if rule.fallback is not None:
        cx, cy, s = rule.fallback
        log.warning("%s: no carpal pixel predicted; using the fallback palm box", name)
    else:
        cx, cy, s = 0.5, 0.5, DEFAULT_SIDE
        log.warning("%s: no carpal pixel predicted and no fallback box; using a centred box of side %.2f", name, s)
    return Box.around(cx * w, cy * h, s * min(h, w), image_shape)


# ------------------------------------------------------------------------------ mapping


def points_to_crop(points: np.ndarray, box: Box, scale: float) -> np.ndarray:
    """(N, 2) source x,y -> float crop coordinates of the box crop upscaled by `scale`."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (pts - [box.x0, box.y0] + 0.5) * scale - 0.5


def _clip_edge(poly: np.ndarray, axis: int, bound: float, keep_below: bool) -> np.ndarray:
    """One Sutherland–Hodgman step: keep the part of a closed polygon on one side of x/y = bound."""
    if len(poly) == 0:
        return poly
    v = poly[:, axis]
    inside = v <= bound if keep_below else v >= bound
    out = []
    n = len(poly)
    for i in range(n):
        p, q = poly[i], poly[(i + 1) % n]
        pin, qin = inside[i], inside[(i + 1) % n]
        if pin:
            out.append(p)
        if pin != qin:
            t = (bound - p[axis]) / (q[axis] - p[axis])
            out.append(p + t * (q - p))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def _offset_polygon(poly: np.ndarray, d: float) -> np.ndarray:
    """Move every edge of a closed polygon outward by `d` (miter joins, spikes limited to 2d)."""
    keep = np.any(poly != np.roll(poly, 1, axis=0), axis=1)
    poly = poly[keep]
    if d == 0 or len(poly) < 3:
        return poly
    x, y = poly[:, 0], poly[:, 1]
    area2 = np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))
    if area2 == 0:
        return poly
    e = np.roll(poly, -1, axis=0) - poly  # edge i: vertex i -> i+1
    n = np.stack([e[:, 1], -e[:, 0]], 1) / np.linalg.norm(e, axis=1, keepdims=True)
    n *= np.sign(area2)  # outward for either orientation
    m = n + np.roll(n, 1, axis=0)  # vertex i joins edges i-1 and i
    dot = np.einsum("ij,ij->i", m, n)
    step = np.where(dot[:, None] > 1e-6, m / np.maximum(dot, 1e-6)[:, None], n)
    length = np.linalg.norm(step, axis=1, keepdims=True)
    step = np.where(length > 2, step * 2 / np.maximum(length, 1e-12), step)
    return poly + d * step


def polygon_to_crop(points: np.ndarray, box: Box, scale: float) -> np.ndarray | None:
    """A source polygon mapped into the upscaled crop and clipped to it (Sutherland–Hodgman).

    The outline is moved outward by (scale - 1) / 2 crop pixels: fillPoly fills every pixel
    whose centre is on or inside the outline, so a polygon's raster reaches about half a
    pixel beyond it at whatever resolution it is drawn; the offset keeps the crop raster
    equal to the source raster upscaled (otherwise crop masks would be half a SOURCE pixel
    thinner on every side, which costs Dice on small carpals when mapped back).
    Clipping, not per-point clamping, so the shape inside the crop is unchanged.

    Returns (N, 2) int32 crop coordinates, or None if nothing of it (>= 3 distinct points
    with non-zero area) is left inside the crop.
    """
    poly = _offset_polygon(points_to_crop(points, box, scale), (scale - 1) / 2)
    last = box.side * scale - 1
    for axis in (0, 1):
        poly = _clip_edge(poly, axis, 0.0, keep_below=False)
        poly = _clip_edge(poly, axis, float(last), keep_below=True)
    if len(poly) < 3:
        return None
    pts = np.rint(poly).astype(np.int32)
    keep = np.any(pts != np.roll(pts, 1, axis=0), axis=1)  # drop repeated vertices
    pts = pts[keep]
    if len(pts) < 3:
        return None
    x, y = pts[:, 0].astype(np.float64), pts[:, 1].astype(np.float64)
    if abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) == 0:
        return None
    return pts


def crop_image(image, box: Box, scale: int = 1):
    """The box crop of an (..., H, W) numpy array or torch tensor (a view, no copy). With
    `scale`, `image` is already upscaled by that factor (an upscaled context crop) and `box`
    is in its source pixels: the region is rows y0·scale .. y1·scale."""
    if scale == 1:
        rows, cols = box.slices
    else:
        rows, cols = slice(box.y0 * scale, box.y1 * scale), slice(box.x0 * scale, box.x1 * scale)
    return image[..., rows, cols]
