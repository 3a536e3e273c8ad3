"""Pictures a person reads to judge a model: GT / prediction / overlap views and the per-class change in Dice.

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

from ..classes import CLASSES, GROUPS, PALM_CLASSES
from ..errors import TwostageError
from ..io.files import write_png_atomic

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


CHART_COLOURS = [(0, 140, 255), (80, 200, 60), (230, 120, 30), (180, 80, 200)]
"""BGR colours of the compared series (the reference has no bar)."""


def _tick_step(span: float) -> float:
    """A round step that puts at most 8 grid lines over `span`."""
    for step in (0.001, 0.002, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5):
        if span / step <= 8:
            return step
    return 1.0


def dice_change_chart(path: str | os.PathLike, classes: Sequence[str], series: dict[str, Sequence[float]],
                      reference: str = "global", width: int = 960) -> None:
    """Per class, the change in Dice of each series against `reference` (the global model), as
    bars around zero: carpals first, then the carpal mean and the overall mean, then the other
    classes. The palm stage changes Dice by a few hundredths, which a 0-1 axis shrinks to a few
    pixels; an axis fitted to the changes shows them. Numbers sit in their own columns (the
    reference's Dice on the left; each series' Dice and change on the right) and tick labels
    above and below the plot, so no text crosses a bar or a grid line."""
    others = [n for n in series if n != reference]
    rows = _chart_rows(classes, series)
    chart = _ChangeChart(rows, reference, others, width)
    chart.draw_header()
    chart.draw_grid()
    chart.draw_rows()
    write_png_atomic(path, chart.img)


ChartRow = tuple[str, dict[str, float], bool] | None
"""(label, {series: Dice}, bold), or None for a gap between groups."""


def _chart_rows(classes: Sequence[str], series: dict[str, Sequence[float]]) -> list[ChartRow]:
    """Carpals, the carpal mean and the overall mean (bold), then the other classes."""
    values = {n: np.asarray(series[n], np.float64) for n in series}
    carpal = [i for i, c in enumerate(classes) if c in PALM_CLASSES]
    rest = [i for i, c in enumerate(classes) if c not in PALM_CLASSES]
    rows: list[ChartRow] = [(classes[i], {n: values[n][i] for n in series}, True) for i in carpal]
    if carpal:
        rows += [None, ("carpal mean", {n: float(np.mean(values[n][carpal])) for n in series}, True)]
    rows.append(("overall", {n: float(np.mean(values[n])) for n in series}, True))
    if rest:
        rows.append(None)
        rows += [(classes[i], {n: values[n][i] for n in series}, False) for i in rest]
    return rows


class _ChangeChart:
    """The canvas of `dice_change_chart`: an axis fitted to the changes (round ticks, zero
    included), the name and reference columns left of the plot, one column per series right."""

    FONT, BAR_H, GAP = 0, 8, 2  # cv2.FONT_HERSHEY_SIMPLEX
    NAME_W, REF_W, COL_W, TOP = 118, 70, 128, 92
    INK, GREY, LIGHT = (0, 0, 0), (90, 90, 90), (225, 225, 225)

    def __init__(self, rows: list[ChartRow], reference: str, others: list[str], width: int):
        self.rows, self.reference, self.others = rows, reference, others
        deltas = [r[1][n] - r[1][reference] for r in rows if r for n in others]
        deltas = [d for d in deltas if np.isfinite(d)] or [0.0]
        lo, hi = min(0.0, min(deltas)), max(0.0, max(deltas))
        self.step = _tick_step(max(hi - lo, 0.005))
        self.lo = np.floor(lo / self.step + 1e-9) * self.step
        self.hi = max(np.ceil(hi / self.step - 1e-9) * self.step, self.lo + self.step)
        self.row_h = 6 + len(others) * (self.BAR_H + self.GAP)
        self.plot_x0, self.plot_x1 = self.NAME_W + self.REF_W + 24, width - self.COL_W * len(others) - 24
        self.body = sum(self.row_h if r else 10 for r in rows)
        self.width, self.height = width, self.TOP + self.body + 34
        self.img = np.full((self.height, width, 3), 255, np.uint8)

    def text(self, s: str, x: int, y: int, scale: float = 0.42, colour=INK, bold: bool = False,
             right: bool = False) -> None:
        import cv2

        if right:
            x -= cv2.getTextSize(s, self.FONT, scale, 2 if bold else 1)[0][0]
        cv2.putText(self.img, s, (x, y), self.FONT, scale, colour, 2 if bold else 1, cv2.LINE_AA)

    def px(self, d: float) -> int:
        return int(round(self.plot_x0 + (d - self.lo) / (self.hi - self.lo) * (self.plot_x1 - self.plot_x0)))

    def column_x(self, k: int) -> int:
        return self.plot_x1 + 28 + k * self.COL_W

    def draw_header(self) -> None:
        """Title, the reference column's heading, one legend swatch and heading per series."""
        import cv2

        self.text(f"Dice per class: change against the {self.reference} model", 8, 22, 0.6, bold=True)
        self.text(f"{self.reference} Dice", self.NAME_W + self.REF_W, self.TOP - 24, 0.4, self.GREY, right=True)
        for k, n in enumerate(self.others):
            x = self.column_x(k)
            cv2.rectangle(self.img, (x, 34), (x + 12, 46), CHART_COLOURS[k % len(CHART_COLOURS)], -1)
            self.text(n, x + 18, 45, 0.45)
            self.text("Dice   change", x, self.TOP - 24, 0.4, self.GREY)

    def draw_grid(self) -> None:
        """Grid lines at round steps (zero darker), labelled above and below the plot."""
        import cv2

        y_plot0, y_plot1 = self.TOP - 4, self.TOP + self.body + 2
        for t in np.arange(self.lo, self.hi + self.step / 2, self.step):
            x = self.px(t)
            cv2.line(self.img, (x, y_plot0), (x, y_plot1), (150, 150, 150) if abs(t) < 1e-12 else self.LIGHT, 1)
            label = "0" if abs(t) < 1e-12 else f"{t:+.3f}".rstrip("0")
            w = cv2.getTextSize(label, self.FONT, 0.36, 1)[0][0]
            self.text(label, x - w // 2, self.TOP - 10, 0.36, self.GREY)
            self.text(label, x - w // 2, y_plot1 + 14, 0.36, self.GREY)
        self.text(f"change in Dice ({' / '.join(self.others)} minus {self.reference})", self.plot_x0,
                  self.height - 6, 0.38, self.GREY)

    def draw_rows(self) -> None:
        """Per row: its name, the reference Dice, a bar per series and its Dice and change."""
        import cv2

        y = self.TOP
        for row in self.rows:
            if row is None:
                cv2.line(self.img, (8, y + 5), (self.width - 8, y + 5), self.LIGHT, 1)
                y += 10
                continue
            label, vals, bold = row
            mid = y + self.row_h // 2 + 4
            self.text(label, 8, mid, 0.45, bold=bold)
            r = vals[self.reference]
            self.text(f"{r:.4f}" if np.isfinite(r) else "-", self.NAME_W + self.REF_W, mid, 0.42, right=True)
            for k, n in enumerate(self.others):
                d = vals[n] - r
                y0 = y + 3 + k * (self.BAR_H + self.GAP)
                if np.isfinite(d) and abs(d) > 0:
                    x0, x1 = sorted((self.px(0.0), self.px(d)))
                    cv2.rectangle(self.img, (x0, y0), (max(x1, x0 + 1), y0 + self.BAR_H - 1),
                                  CHART_COLOURS[k % len(CHART_COLOURS)], -1)
                moved = np.isfinite(d) and abs(d) >= 5e-5
                shown = "-" if not np.isfinite(d) else f"{vals[n]:.4f}   {d:+.4f}" if moved else f"{vals[n]:.4f}   0"
                self.text(shown, self.column_x(k), mid, 0.4, self.INK if moved else self.GREY)
            y += self.row_h


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
        from ..box import BoxRule

        self.fuse, self.chain, self.index = fuse, None, None
        if fuse and palm_ckpt is None:
            raise TwostageError("--fuse needs a palm checkpoint (--palm CKPT)")
        if csv is None:
            from ..inference.chain import TwoStage

            self.chain = TwoStage.build(global_ckpt, palm_ckpt, **(options or {}))
            self.classes = list(CLASSES)
            return
        from ..inference.chain import refuse_chain_options
        from .ensemble import CsvIndex

        refuse_chain_options(options or {}, fuse)
        self.index = CsvIndex(csv)
        self.classes = [c for c in CLASSES if c in self.index.classes]
        self.rule = BoxRule()
        if palm_ckpt is not None:  # draw the box by this palm model's rule
            from ..checkpoint import load_checkpoint
            from ..inference.chain import palm_box_rule

            self.rule = palm_box_rule(load_checkpoint(palm_ckpt, expect_stage="palm")["meta"])

    def __call__(self, name: str, image: np.ndarray) -> tuple[np.ndarray, object]:
        """(29, H, W) bool masks (classes the source lacks stay empty) and the palm box or None."""
        if self.chain is not None:
            seg = self.chain.predict(image, name, fuse=self.fuse)
            return seg.masks.cpu().numpy(), seg.box
        import torch

        from ..box import boxes_from_probs
        from ..rle import decode

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

    from ..data.fixes import select_samples
    from ..data.masks import load_masks
    from ..io.images import read_image
    from ..metrics import dice_per_class

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
