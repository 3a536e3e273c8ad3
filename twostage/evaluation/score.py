"""Scoring a prediction CSV against an annotated data root (the `score` command), and the
per-group breakdown by a metadata column. The Dice rule itself is `twostage.metrics`."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..classes import CLASS_TO_INDEX, CLASSES, class_indices
from ..errors import TwostageError, first_few
from ..metrics import ScoreReport, dice_per_class, summarize

log = logging.getLogger(__name__)


def score_csv(pred_csv: str | os.PathLike, gt_root: str | os.PathLike,
              fixes: Any = None, classes: Sequence[str] | None = None) -> ScoreReport:
    """Score a prediction CSV against the annotated images under `gt_root`.

    Args:
        pred_csv: the prediction CSV (may hold more classes than `classes`).
        gt_root: dataset root or split folder with DCM/ and outputs_json/ (see find_samples).
        fixes: a `twostage.data.fixes.Fixes` or the path of a fixes YAML; dropped images are not scored.
        classes: class names to score (default all 29); every GT image needs a row for each.
    Raises:
        TwostageError: GT images or (image, class) rows missing from the CSV, a malformed
        RLE (naming image and class), GT images without annotations, unknown class names.
    """
    from tqdm import tqdm

    from ..data.fixes import select_samples
    from ..data.masks import load_masks
    from ..rle import decode, read_csv

    pred_csv = Path(pred_csv)
    classes = tuple(CLASSES if classes is None else classes)
    class_indices(classes)  # validates the names
    samples, fixes = select_samples(gt_root, None, fixes)
    unannotated = [s.rel for s in samples if s.json_path is None]
    if unannotated:
        raise TwostageError(f"{gt_root}: no annotation JSON for {len(unannotated)} image(s) "
                            f"({first_few(unannotated)}); score needs ground truth")
    by_name: dict[str, Any] = {}
    for s in samples:
        if s.name in by_name:
            raise TwostageError(f"{gt_root}: image name {s.name} appears twice ({by_name[s.name].rel}, {s.rel}); "
                                f"CSV rows are keyed by basename")
        by_name[s.name] = s

    preds = read_csv(pred_csv)
    unknown = sorted({c for rows in preds.values() for c in rows if c not in CLASS_TO_INDEX})
    if unknown:
        raise TwostageError(f"{pred_csv}: unknown class name(s) {first_few(unknown)}")
    missing_images = [n for n in by_name if n not in preds]
    if missing_images:
        raise TwostageError(f"{pred_csv}: missing {len(missing_images)} of {len(by_name)} ground-truth "
                            f"image(s): {first_few(missing_images)}")
    missing = [f"{n}/{c}" for n in by_name for c in classes if c not in preds[n]]
    if missing:
        absent = [c for c in classes if all(c not in preds[n] for n in by_name)]
        what = f"no rows for class(es) {first_few(absent)}" if absent else f"missing rows {first_few(missing)}"
        raise TwostageError(f"{pred_csv}: {what} ({len(missing)} image/class row(s) missing)")
    extra = [n for n in preds if n not in by_name]
    if extra:
        log.warning("%s: %d image(s) not in the ground truth, not scored: %s", pred_csv, len(extra), first_few(extra))

    per_image = {}
    for name, sample in tqdm(by_name.items(), desc="score", unit="img", disable=None):
        gt = load_masks(sample, classes, fixes)
        pred = np.empty_like(gt)
        for i, c in enumerate(classes):
            try:
                pred[i] = decode(preds[name][c], gt.shape[1:])
            except TwostageError as e:
                raise TwostageError(f"{pred_csv}: image {name} class {c}: {e}") from None
        per_image[name] = dice_per_class(pred, gt)
    report = summarize(per_image, classes)
    report.extra_images = extra
    return report


# --------------------------------------------------------------------------- metadata breakdown

UNKNOWN_GROUP = "unknown"
"""Group of images whose person has no metadata row or no value in the column."""


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def _bin_label(x: float, edges: Sequence[float]) -> str:
    if x < edges[0]:
        return f"<{edges[0]:g}"
    for lo, hi in zip(edges[:-1], edges[1:]):
        if x < hi:
            return f"{lo:g}-{hi:g}"
    return f">={edges[-1]:g}"


def breakdown_by(report: ScoreReport | dict[str, np.ndarray], metadata: dict[str, dict], key: str,
                 ids: dict[str, str], bins: Sequence[float] | int | None = None,
                 classes: Sequence[str] | None = None) -> dict[str, ScoreReport]:
    """Per-image Dice grouped by a metadata column (sex, age bins, …): one ScoreReport per group.

    Args:
        report: a ScoreReport (its per-image Dice) or {image_name: (C,) Dice}.
        metadata: `twostage.data.metadata.load_metadata` table {person ID: {column: value}}.
        key: column name (lower-case, as load_metadata names it, e.g. "age", "sex").
        ids: {image_name: person ID} (`Sample.id`), joining images to metadata rows.
        bins: for a numeric column, ascending bin edges ([20, 40, 60] → "<20", "20-40",
            "40-60", ">=60") or a number of quantile bins; default: the values themselves
            when there are at most 6 distinct ones, else 4 quantile bins.
    Returns:
        {group label: ScoreReport}, groups sorted (numeric bins in order), "unknown" last.
    """
    per_image = report.per_image if isinstance(report, ScoreReport) else report
    classes = tuple(report.classes if isinstance(report, ScoreReport) else (classes or CLASSES))
    columns = sorted({c for row in metadata.values() for c in row})
    if key not in columns:
        import difflib

        close = difflib.get_close_matches(key, columns, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TwostageError(f"metadata has no column {key!r}{hint}; columns: {', '.join(columns) or 'none'}")
    missing_ids = [n for n in per_image if n not in ids]
    if missing_ids:
        raise TwostageError(f"no person ID for image(s) {first_few(missing_ids)}")
    values = {n: metadata.get(ids[n], {}).get(key) for n in per_image}
    numbers = {n: _number(v) for n, v in values.items()}
    known = [x for x in numbers.values() if x is not None]
    numeric = bool(known) and all(x is not None or values[n] in (None, "") for n, x in numbers.items())
    if numeric and isinstance(bins, int) or (numeric and bins is None and len(set(known)) > 6):
        q = np.quantile(known, np.linspace(0, 1, (bins if isinstance(bins, int) else 4) + 1))
        bins = sorted(set(float(np.round(e, 6)) for e in q[1:-1])) or [float(q[0])]
    if bins is not None and not numeric:
        raise TwostageError(f"metadata column {key!r} is not numeric; --bins applies to numeric columns")
    if bins is not None and list(bins) != sorted(bins):
        raise TwostageError(f"--bins {list(bins)}: edges must be ascending")

    groups: dict[str, dict[str, np.ndarray]] = {}
    order: dict[str, float] = {}
    for name, dice in per_image.items():
        v, x = values[name], numbers[name]
        if v in (None, ""):
            label, rank = UNKNOWN_GROUP, float("inf")
        elif bins is not None:
            label, rank = _bin_label(x, list(bins)), x
        else:
            label, rank = (f"{x:g}", x) if numeric else (str(v), 0.0)
        groups.setdefault(label, {})[name] = dice
        order[label] = min(order.get(label, float("inf")), rank)
    labels = sorted(groups, key=lambda g: (order[g], g))
    return {g: summarize(groups[g], classes) for g in labels}


def breakdown_table(groups: dict[str, ScoreReport], key: str) -> str:
    """Text table: one row per group with its image count, carpal mean and overall Dice."""
    header = [key, "images", "carpal mean", "overall"]
    rows = [[g, str(r.n_images), "-" if r.carpal_mean is None else f"{r.carpal_mean:.4f}", f"{r.overall:.4f}"]
            for g, r in groups.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])])

    return "\n".join([fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in rows])


def metadata_breakdown(report: ScoreReport, gt_root: str | os.PathLike, key: str,
                       bins: Sequence[float] | int | None = None) -> dict[str, ScoreReport]:
    """`breakdown_by` for a report scored against `gt_root`: its metadata table and person IDs."""
    from ..data.layout import find_samples
    from ..data.metadata import load_metadata

    metadata = load_metadata(gt_root)
    if not metadata:
        raise TwostageError(f"{gt_root}: no meta_data.csv/.xlsx to group by {key!r}")
    ids = {s.name: s.id for s in find_samples(gt_root)}
    return breakdown_by(report, metadata, key, ids, bins)
