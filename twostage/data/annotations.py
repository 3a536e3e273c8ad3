"""The annotation JSON of docs/DESIGN.md §1 (reading, writing) and its polygons rasterised into
29 independent binary masks."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..classes import CLASSES
from ..errors import TwostageError
from ..io.files import write_json_atomic
from ..io.readers import read_json

MAX_COORDINATE = 2**31 - 1
"""Largest |x| or |y| of a polygon point: points are stored as int32 (beyond it they would wrap)."""


@dataclass
class Annotation:
    """One polygon: a label from CLASSES (or an unknown one, reported by `check`) and (N, 2) x,y points."""

    label: str
    points: np.ndarray  # (N, 2) int32, x then y
    id: str | None = None  # the JSON annotation "id", used by the fixes file


def parse_annotations(obj: object, source: str = "<json>") -> list[Annotation]:
    """Annotations from a loaded JSON object; malformed structure is a TwostageError naming `source`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list):
        raise TwostageError(f"{source}: no 'annotations' list")
    out = []
    for k, a in enumerate(obj["annotations"]):
        if not isinstance(a, dict) or "label" not in a or "points" not in a:
            raise TwostageError(f"{source}: annotation {k} lacks 'label' or 'points'")
        label = str(a["label"])
        try:
            pts = np.asarray(a["points"], dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float64
            raise TwostageError(f"{source}: annotation {k} ({label}) has non-numeric points") from None
        if pts.size and not np.isfinite(pts).all():
            raise TwostageError(f"{source}: annotation {k} ({label}) has NaN/infinite points")
        pts = np.rint(pts)
        if pts.size and np.abs(pts).max() > MAX_COORDINATE:
            raise TwostageError(f"{source}: annotation {k} ({label}) has a point beyond ±{MAX_COORDINATE} "
                                f"({np.abs(pts).max():.6g}); points are pixel coordinates")
        ann_id = a.get("id")
        out.append(Annotation(label, pts.astype(np.int32), None if ann_id is None else str(ann_id)))
    return out


def read_annotations(json_path: str | os.PathLike) -> list[Annotation]:
    """Read one annotation JSON file (label fixes are applied by the caller, see `load_annotations`)."""
    return parse_annotations(read_json(json_path, "annotation file"), str(json_path))


def annotations_to_json(annotations: Iterable[Annotation], filename: str, shape: tuple[int, int]) -> dict:
    """The annotation JSON object for a list of annotations (ids kept, running numbers where absent)."""
    h, w = shape
    return {
        "annotations": [
            {"id": a.id if a.id is not None else f"id-{i:04d}", "type": "poly_seg", "attributes": {},
             "label": a.label,
             "points": np.asarray(a.points).astype(int).tolist()}
            for i, a in enumerate(annotations)
        ],
        "metadata": {"width": int(w), "height": int(h)},
        "filename": filename,
    }


def write_annotations(path: str | os.PathLike, annotations: Iterable[Annotation], filename: str,
                      shape: tuple[int, int], metadata: dict | None = None) -> None:
    """Write an annotation JSON file atomically. `metadata` overrides the (untrusted) metadata block."""
    obj = annotations_to_json(annotations, filename, shape)
    if metadata is not None:
        obj["metadata"] = metadata
    write_json_atomic(path, obj)


def rasterize(annotations: Iterable[Annotation], shape: tuple[int, int],
              classes: Sequence[str] = CLASSES) -> np.ndarray:
    """(C, H, W) uint8 {0,1} masks, one independent channel per class (overlaps kept).

    Polygons are filled with OpenCV fillPoly at their exact integer vertices; polygons of
    fewer than 3 points and labels not in `classes` are skipped (`check` reports them).
    """
    import cv2

    index = {c: i for i, c in enumerate(classes)}
    masks = np.zeros((len(classes), *shape), dtype=np.uint8)
    for a in annotations:
        i = index.get(a.label)
        if i is None or len(a.points) < 3:
            continue
        cv2.fillPoly(masks[i], [np.asarray(a.points, dtype=np.int32).reshape(-1, 1, 2)], 1)
    return masks
