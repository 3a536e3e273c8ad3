"""Dice scores of docs/DESIGN.md §2 and the score report: per class, carpal mean, overall.
Scoring a CSV against a data root is `evaluation.score`.

Dice per image per class = (2·|A∩B| + 1e-4) / (|A| + |B| + 1e-4), so two empty masks score 1;
the report averages over images first, then over classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .classes import CLASSES, PALM_CLASSES
from .errors import TwostageError

DICE_EPS = 1e-4
"""Smoothing term of the Dice formula (docs/DESIGN.md §2) (makes both-empty score exactly 1)."""


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def dice_per_class(pred: Any, gt: Any) -> np.ndarray:
    """(C,) float64 Dice of each channel of two (C, H, W) masks (nonzero = foreground).

    numpy arrays or torch tensors (counted on the tensor's device; a numpy partner is moved
    there); only the 3·C pixel counts come back to the CPU.
    """
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
    c = int(pred.shape[0])
    if _is_torch(pred) or _is_torch(gt):
        import torch

        device = pred.device if _is_torch(pred) else gt.device
        p = torch.as_tensor(pred, device=device).reshape(c, -1) != 0
        g = torch.as_tensor(gt, device=device).reshape(c, -1) != 0
        counts = torch.stack([(p & g).sum(1), p.sum(1), g.sum(1)]).cpu().numpy()
    else:
        p = np.asarray(pred).reshape(c, -1)
        g = np.asarray(gt).reshape(c, -1)
        p = p.view(np.bool_) if p.dtype == np.uint8 and p.max(initial=0) <= 1 else p != 0
        g = g.view(np.bool_) if g.dtype == np.uint8 and g.max(initial=0) <= 1 else g != 0
        counts = np.stack([np.count_nonzero(p & g, axis=1), np.count_nonzero(p, axis=1),
                           np.count_nonzero(g, axis=1)])
    inter, a, b = counts.astype(np.float64)
    return (2.0 * inter + DICE_EPS) / (a + b + DICE_EPS)


@dataclass
class ScoreReport:
    """Mean Dice per class over images, the carpal mean and the overall mean."""

    classes: tuple[str, ...]
    per_class: np.ndarray  # (C,) float64, mean over images
    carpal_mean: float | None  # mean over the PALM_CLASSES among `classes`; None if none
    overall: float  # mean over classes
    n_images: int
    per_image: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (C,) Dice
    extra_images: list[str] = field(default_factory=list)  # predicted images not in the GT

    def to_dict(self) -> dict:
        """JSON-safe report (per-image Dice as lists in `classes` order)."""
        return {
            "classes": list(self.classes),
            "per_class": {c: float(v) for c, v in zip(self.classes, self.per_class)},
            "carpal_mean": self.carpal_mean,
            "overall": self.overall,
            "n_images": self.n_images,
            "extra_images": list(self.extra_images),
            "per_image": {k: [float(v) for v in d] for k, d in self.per_image.items()},
        }

    def value(self, cls: str) -> float | None:
        """Mean Dice of one class, None if this report does not score it."""
        return float(self.per_class[self.classes.index(cls)]) if cls in self.classes else None

    def table(self, other: ScoreReport | None = None, names: tuple[str, str] = ("global", "fused")) -> str:
        """Aligned text table: one row per class, then carpal mean and overall.

        With `other`, the two reports side by side (columns `names`) and `other − self`;
        classes present in only one report show "-".
        """
        if other is None:
            return side_by_side([self], ["dice"])
        return side_by_side([self, other], names)


def side_by_side(reports: Sequence[ScoreReport], names: Sequence[str]) -> str:
    """Reports as columns `names`, then each later report minus the first ("diff" when there are
    two, "<name>-<first>" otherwise); classes missing from a report show "-"."""
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    def diff(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{b - a:+.4f}"

    first = reports[0]
    classes = list(first.classes) + [c for r in reports[1:] for c in r.classes if c not in first.classes]
    classes = list(dict.fromkeys(classes))
    diffs = ["diff"] if len(reports) == 2 else [f"{n}-{names[0]}" for n in names[1:]]
    header = ["class", *names, *diffs]
    rows: list[list[str] | None] = []
    for label, values in (
        *((c, [r.value(c) for r in reports]) for c in classes),
        (None, None),
        ("carpal mean", [r.carpal_mean for r in reports]),
        ("overall", [r.overall for r in reports]),
    ):
        if label is None:
            rows.append(None)
            continue
        rows.append([label] + [fmt(v) for v in values] + [diff(values[0], v) for v in values[1:]])
    rows.append(["images"] + [str(r.n_images) for r in reports] + [""] * (len(reports) - 1))
    widths = [max(len(r[i]) for r in [header] + [r for r in rows if r]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])]).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule] + [rule if r is None else line(r) for r in rows])


def summarize(per_image: dict[str, np.ndarray], classes: Sequence[str] = CLASSES) -> ScoreReport:
    """Average per-image Dice vectors ((C,) in `classes` order) into a ScoreReport."""
    classes = tuple(classes)
    if not per_image:
        raise TwostageError("no images to score")
    stack = np.stack([np.asarray(v, dtype=np.float64) for v in per_image.values()])
    if stack.shape[1] != len(classes):
        raise ValueError(f"per-image Dice has {stack.shape[1]} values, expected {len(classes)} (one per class)")
    per_class = stack.mean(axis=0)
    carpal = [per_class[i] for i, c in enumerate(classes) if c in PALM_CLASSES]
    return ScoreReport(
        classes=classes,
        per_class=per_class,
        carpal_mean=float(np.mean(carpal)) if carpal else None,
        overall=float(per_class.mean()),
        n_images=len(per_image),
        per_image=dict(per_image),
    )
