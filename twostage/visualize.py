"""Pictures a person reads to judge a model: GT / prediction / overlap views and Dice bars.

Colours: in the overlap view green = predicted and true, red = predicted only (false
positive), blue = true only (missed); errors are drawn over agreement so they stay visible.
Drawn with OpenCV only (no plotting dependency).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .classes import CLASSES, GROUPS, PALM_CLASSES
from .errors import TwostageError
from .io import write_png_atomic

# BGR colours (OpenCV order).
TRUE_POSITIVE = (80, 200, 60)
FALSE_POSITIVE = (40, 40, 230)
FALSE_NEGATIVE = (230, 120, 30)
BOX_COLOUR = (0, 220, 255)


def class_palette(n: int = len(CLASSES)) -> np.ndarray:
    """(n, 3) uint8 BGR: distinct hues so neighbouring bones differ."""
    import cv2

    hues = (np.arange(n) * 137.508) % 180  # golden-angle steps in OpenCV's 0..180 hue
    hsv = np.stack([hues, np.full(n, 200), np.full(n, 255)], axis=1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0]


def _base(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2).astype(np.float32)


def draw_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H,W) uint8 image with (C,H,W) masks tinted in per-class colours → (H,W,3) uint8 BGR."""
    out = _base(image)
    palette = class_palette(masks.shape[0]).astype(np.float32)
    m = masks.astype(bool)
    count = m.sum(0)
    colour = np.tensordot(m.astype(np.float32), palette, axes=(0, 0))  # (H,W,3) sum of colours
    has = count > 0
    colour[has] /= count[has, None]
    out[has] = (1 - alpha) * out[has] + alpha * colour[has]
    return out.clip(0, 255).astype(np.uint8)


def draw_overlap(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Three-colour agreement view of (C,H,W) GT and prediction over the image → (H,W,3) uint8."""
    gt = gt.astype(bool)
    pred = pred.astype(bool)
    layers = [((gt & pred).any(0), TRUE_POSITIVE), ((gt & ~pred).any(0), FALSE_NEGATIVE),
              ((pred & ~gt).any(0), FALSE_POSITIVE)]
    out = _base(image)
    for mask, colour in layers:  # later layers (errors) win
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def draw_box(picture: np.ndarray, box, thickness: int = 2) -> np.ndarray:
    """Draw a palm box (anything with x0, y0, side) on a BGR picture, in place."""
    import cv2

    if box is not None:
        cv2.rectangle(picture, (int(box.x0), int(box.y0)),
                      (int(box.x0 + box.side - 1), int(box.y0 + box.side - 1)), BOX_COLOUR, thickness)
    return picture


def _label(picture: np.ndarray, text: str) -> np.ndarray:
    import cv2

    scale = max(picture.shape[1] / 700, 0.4)
    cv2.putText(picture, text, (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                max(1, int(2 * scale)), cv2.LINE_AA)
    return picture


def comparison_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, box=None,
                     title: str = "") -> np.ndarray:
    """GT-only | prediction-only | overlap, side by side, palm box drawn on each."""
    panels = [
        _label(draw_box(draw_masks(image, gt), box), "ground truth"),
        _label(draw_box(draw_masks(image, pred), box), f"{title} prediction".strip()),
        _label(draw_box(draw_overlap(image, gt, pred), box),
               f"{title} overlap: green ok, red extra, blue missed".strip()),
    ]
    return np.concatenate(panels, axis=1)


def write_comparison(path: str | os.PathLike, image: np.ndarray, gt: np.ndarray,
                     rows: Sequence[tuple[str, np.ndarray, object]]) -> None:
    """One PNG with a comparison_panel row per (title, pred masks, box) — e.g. global vs fused."""
    picture = np.concatenate([comparison_panel(image, gt, pred, box, title) for title, pred, box in rows],
                             axis=0)
    write_png_atomic(path, picture)


def dice_bar_chart(path: str | os.PathLike, classes: Sequence[str], series: dict[str, Sequence[float]],
                   width: int = 900) -> None:
    """Horizontal bar chart of per-class Dice for each named series (e.g. global vs fused)."""
    import cv2

    colours = [(160, 160, 160), (0, 140, 255), (80, 200, 60), (230, 120, 30)]
    names = list(series)
    row_h, bar_h, left, top = 8 + 12 * len(names), 11, 150, 40
    height = top + row_h * len(classes) + 20
    img = np.full((height, width, 3), 255, np.uint8)
    span = width - left - 60
    for k, name in enumerate(names):
        x = left + k * 160
        cv2.rectangle(img, (x, 10), (x + 14, 24), colours[k % len(colours)], -1)
        cv2.putText(img, name, (x + 20, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for i, c in enumerate(classes):
        y = top + i * row_h
        weight = 2 if c in PALM_CLASSES else 1
        cv2.putText(img, c, (8, y + row_h - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), weight, cv2.LINE_AA)
        for k, name in enumerate(names):
            v = float(series[name][i])
            y0 = y + 4 + k * 12
            cv2.rectangle(img, (left, y0), (left + int(span * max(v, 0.0)), y0 + bar_h - 2),
                          colours[k % len(colours)], -1)
            cv2.putText(img, f"{v:.2f}", (left + int(span * max(v, 0.0)) + 4, y0 + bar_h - 3),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + int(span * t)
        cv2.line(img, (x, top - 4), (x, height - 16), (220, 220, 220), 1)
        cv2.putText(img, f"{t:g}", (x - 8, height - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (90, 90, 90), 1)
    write_png_atomic(path, img)


# --------------------------------------------------------------------------- `twostage visualize`

LEGEND_GROUPS = GROUPS
"""Anatomical groups the class legend is laid out by (one line per group)."""


def legend(classes: Sequence[str], width: int, header: str = "") -> np.ndarray:
    """(h, width, 3) BGR strip: an optional header line (e.g. image and Dice), the overlap
    colour key, then a swatch per class in its class_palette colour, one line per anatomical
    group (wrapped to `width`)."""
    import cv2

    palette = class_palette()
    font, scale, th, line_h = cv2.FONT_HERSHEY_SIMPLEX, 0.42, 1, 20
    # a line is a list of (swatch colour or None for plain text, text)
    lines: list[list[tuple[tuple[int, int, int] | None, str]]] = [[(None, header)]] if header else []
    lines.append([(TRUE_POSITIVE, "GT and prediction"), (FALSE_POSITIVE, "prediction only"),
                  (FALSE_NEGATIVE, "GT only"), (BOX_COLOUR, "palm box")])
    chosen = set(classes)
    for group, names in LEGEND_GROUPS:
        entries = [(tuple(int(v) for v in palette[CLASSES.index(c)]), c) for c in names if c in chosen]
        if entries:
            lines.append([(None, f"{group}:")] + entries)
    placed, y = [], 0
    for entries in lines:
        x = 6
        for colour, text in entries:
            tw = cv2.getTextSize(text, font, scale, th)[0][0] + (20 if colour else 0)
            if x + tw > width and x > 6:
                x, y = 6, y + line_h
            placed.append((x, y, colour, text))
            x += tw + 14
        y += line_h
    strip = np.full((y + 6, width, 3), 24, np.uint8)
    for x, y0, colour, text in placed:
        if colour is not None:
            cv2.rectangle(strip, (x, y0 + 6), (x + 14, y0 + 18), colour, -1)
            x += 20
        cv2.putText(strip, text, (x, y0 + 17), font, scale, (235, 235, 235), th, cv2.LINE_AA)
    return strip


def _fit(picture: np.ndarray, panel_width: int, max_side: int) -> np.ndarray:
    """Scale a row of 3 panels down so each is at most `max_side` wide."""
    import cv2

    if panel_width <= max_side:
        return picture
    f = max_side / panel_width
    size = (max(1, round(picture.shape[1] * f)), max(1, round(picture.shape[0] * f)))
    return cv2.resize(picture, size, interpolation=cv2.INTER_AREA)


def _zoom(array: np.ndarray, factor: float) -> np.ndarray:
    """Enlarge an (H, W) image (bilinear) or (C, H, W) bool masks (nearest) by `factor`."""
    import cv2

    if factor == 1.0:
        return array
    if array.ndim == 2:
        return cv2.resize(array, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    return np.stack([cv2.resize(m.view(np.uint8), None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
                     for m in array]).astype(bool)


def _error_window(gt: np.ndarray, pred: np.ndarray, shape: tuple[int, int], margin: float = 0.4,
                  min_side: int = 48) -> tuple[slice, slice]:
    """(rows, cols) of a square window around one class's GT ∪ prediction, grown by `margin`."""
    ys, xs = np.nonzero(gt | pred)
    h, w = shape
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    side = int(min(max(max(np.ptp(ys), np.ptp(xs)) * (1 + 2 * margin), min_side), h, w))
    y0 = int(min(max(round(cy - side / 2), 0), h - side))
    x0 = int(min(max(round(cx - side / 2), 0), w - side))
    return slice(y0, y0 + side), slice(x0, x0 + side)


@dataclass
class VisualizeSummary:
    """What `visualize` wrote: one overview per image, plus per-class error pictures."""

    out: str
    images: int
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # images without ground truth


class _Predictions:
    """Masks (and palm boxes) per image from a CSV, or from checkpoints through `chain.TwoStage`."""

    def __init__(self, csv=None, global_ckpt=None, palm_ckpt=None, fuse=False, options: dict | None = None):
        from .box import BoxRule

        self.fuse, self.chain, self.index = fuse, None, None
        if fuse and palm_ckpt is None:
            raise TwostageError("--fuse needs a palm checkpoint (--palm CKPT)")
        if csv is None:
            from .chain import TwoStage

            self.chain = TwoStage.build(global_ckpt, palm_ckpt, **(options or {}))
            self.classes = list(CLASSES)
            return
        from .chain import refuse_chain_options
        from .ensemble import CsvIndex

        refuse_chain_options(options or {}, fuse)
        self.index = CsvIndex(csv)
        self.classes = [c for c in CLASSES if c in self.index.classes]
        self.rule = BoxRule()
        if palm_ckpt is not None:  # draw the box by this palm model's rule
            from .chain import palm_box_rule
            from .checkpoint import load_checkpoint

            self.rule = palm_box_rule(load_checkpoint(palm_ckpt, expect_stage="palm")["meta"])

    def __call__(self, name: str, image: np.ndarray) -> tuple[np.ndarray, object]:
        """(29, H, W) bool masks (classes the source lacks stay empty) and the palm box or None."""
        if self.chain is not None:
            seg = self.chain.predict(image, name, fuse=self.fuse)
            return seg.masks.cpu().numpy(), seg.box
        import torch

        from .box import boxes_from_probs
        from .rle import decode

        h, w = image.shape
        if name not in self.index.spans:
            raise TwostageError(f"{self.index.path}: no rows for image {name}")
        rows = self.index.rows(name)
        masks = np.zeros((len(CLASSES), h, w), bool)
        for c in self.classes:
            try:
                masks[CLASSES.index(c)] = decode(rows[c], (h, w))
            except TwostageError as e:
                raise TwostageError(f"{self.index.path}: image {name} class {c}: {e}") from None
        carpals = masks[[CLASSES.index(c) for c in PALM_CLASSES]]
        box = None
        if carpals.any():  # the box the palm stage would take from these carpals
            box = boxes_from_probs(torch.from_numpy(carpals[None]).float(), self.rule, names=[name])[0]
        return masks, box


def visualize(data: str | os.PathLike, out: str | os.PathLike, *, csv: str | os.PathLike | None = None,
              global_ckpt: str | os.PathLike | None = None, palm_ckpt: str | os.PathLike | None = None,
              fuse: bool = False, images: Sequence[str] | None = None, classes: Sequence[str] | None = None,
              per_class: bool = False, split: str | None = None, fixes=None, max_side: int = 1024,
              **options) -> VisualizeSummary:
    """Write comparison pictures of predictions against the ground truth of DATA.

    Per image, OUT/<stem>.png: ground truth | prediction (class colours) | overlap (green both,
    red prediction only, blue GT only) over the selected classes, the palm box when known, the
    Dice over those classes in the title and a class legend. With `per_class`, also
    OUT/<stem>/<class>.png for every class whose prediction differs from the GT, zoomed on it.

    Args:
        data: dataset root or split folder with annotations.
        csv: a prediction CSV (any subset of classes); its palm box is derived from its
            carpal masks by the box rule of `palm_ckpt` if given, else the default BoxRule.
        global_ckpt, palm_ckpt, fuse: or predict with checkpoints through `chain.TwoStage`
            (`palm_ckpt` without `fuse` only draws the palm box the chain would use).
        images: image names (or stems) to draw; default all annotated images.
        classes: class names to draw (default all the prediction has).
        max_side: panels wider than this are scaled down (pictures of 2048² images stay small).
        options: `chain.ChainOptions` fields (device, thresholds, fuse_weights, tta, ...), as
            `infer` takes them; checkpoints only.
    """
    from tqdm import tqdm

    from .data import load_masks, select_samples
    from .io import read_image
    from .metrics import dice_per_class

    if (csv is None) == (global_ckpt is None):
        raise TwostageError("give either a prediction CSV (--csv) or a global checkpoint (--global)")
    if max_side < 64:
        raise TwostageError(f"--max-side {max_side}: must be at least 64 px")
    samples, fixes = select_samples(data, split, fixes, images)
    summary = VisualizeSummary(out=str(out), images=0)
    summary.skipped = [s.rel for s in samples if s.json_path is None]
    samples = [s for s in samples if s.json_path is not None]
    if not samples:
        raise TwostageError(f"{data}: no annotated images to compare with (visualize needs ground truth)")

    predict = _Predictions(csv, global_ckpt, palm_ckpt, fuse, options)
    chosen = [c for c in (classes or CLASSES) if c in predict.classes]
    if not chosen:
        raise TwostageError(f"{csv}: has none of the selected classes ({', '.join(classes or [])})")
    idx = [CLASSES.index(c) for c in chosen]
    keep = np.zeros(len(CLASSES), bool)
    keep[idx] = True
    out = Path(out)
    for sample in tqdm(samples, desc="visualize", unit="img", disable=None):
        image = read_image(sample.image_path)
        pred, box = predict(sample.name, image)
        gt = load_masks(sample, CLASSES, fixes).astype(bool)
        if gt.shape[1:] != image.shape:
            raise TwostageError(f"{sample.image_path}: image is {image.shape}, its masks {gt.shape[1:]}")
        gt &= keep[:, None, None]
        pred &= keep[:, None, None]
        dice = dice_per_class(pred[idx], gt[idx])
        stem = Path(sample.name).stem
        header = f"{sample.rel}  mean Dice {dice.mean():.3f} over {len(chosen)} class(es)"
        panel = _fit(comparison_panel(image, gt, pred, box), image.shape[1], max_side)
        picture = np.concatenate([panel, legend(chosen, panel.shape[1], header)], axis=0)
        write_png_atomic(out / f"{stem}.png", picture)
        summary.files.append(str(out / f"{stem}.png"))
        if per_class:
            summary.files += _class_pictures(out / stem, image, gt, pred, box, chosen, idx, dice, max_side)
        summary.images += 1
    return summary


def _class_pictures(folder: Path, image: np.ndarray, gt: np.ndarray, pred: np.ndarray, box, chosen: Sequence[str],
                    idx: Sequence[int], dice: np.ndarray, max_side: int) -> list[str]:
    """FOLDER/<class>.png for every drawn class whose prediction differs from the GT, zoomed on it."""
    written = []
    for k, (c, d) in enumerate(zip(chosen, dice)):
        ch = idx[k]
        if not (gt[ch] ^ pred[ch]).any():
            continue
        rows, cols = _error_window(gt[ch], pred[ch], image.shape)
        one_gt = np.zeros_like(gt[:, rows, cols])
        one_pred = np.zeros_like(one_gt)
        one_gt[ch], one_pred[ch] = gt[ch, rows, cols], pred[ch, rows, cols]
        zoom = max(1.0, 256 / (rows.stop - rows.start))  # small bones drawn at a readable size
        local = None if box is None else type(box)(round((box.x0 - cols.start) * zoom),
                                                   round((box.y0 - rows.start) * zoom), round(box.side * zoom))
        crop = comparison_panel(_zoom(image[rows, cols], zoom), _zoom(one_gt, zoom), _zoom(one_pred, zoom), local)
        crop = _fit(crop, crop.shape[0], max_side)
        path = folder / f"{c}.png"
        write_png_atomic(path, np.concatenate([crop, legend([c], crop.shape[1], f"{c}  Dice {d:.3f}")], axis=0))
        written.append(str(path))
    return written
