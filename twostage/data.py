"""The dataset layout of DESIGN §1: finding images, reading/writing annotation JSON,
rasterising polygons into 29 independent binary masks.

Layout: ROOT/{train,test}/DCM/<ID>/<name>.png with ROOT/train/outputs_json/<ID>/<name>.json.
Images and JSON are paired by relative path and stem; `metadata`/`filename` inside the JSON
are never trusted (the PNG beside it is the truth).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .classes import CLASSES
from .errors import TwostageError
from .io import write_json_atomic

IMAGE_DIR = "DCM"
JSON_DIR = "outputs_json"


@dataclass(frozen=True)
class Sample:
    """One image of the dataset, with its annotation file if it has one."""

    image_path: Path
    json_path: Path | None
    rel: str  # posix path relative to the DCM folder, e.g. "ID001/image1_R.png"; sort key

    @property
    def name(self) -> str:
        """PNG basename: the CSV `image_name`."""
        return self.image_path.name

    @property
    def id(self) -> str:
        """Person ID (the folder above the image); both hands of a person share it."""
        parts = self.rel.split("/")
        return parts[-2] if len(parts) > 1 else Path(self.rel).stem


@dataclass
class Annotation:
    """One polygon: a label from CLASSES (or an unknown one, reported by `check`) and (N, 2) x,y points."""

    label: str
    points: np.ndarray  # (N, 2) int32, x then y


def split_dir(root: str | os.PathLike, split: str | None = None) -> Path:
    """Resolve ROOT (dataset root, a split folder, or a DCM folder) to the folder holding DCM/."""
    root = Path(root)
    if not root.exists():
        raise TwostageError(f"{root}: no such folder")
    if not root.is_dir():
        raise TwostageError(f"{root}: not a folder")
    if split is not None:
        if not (root / split / IMAGE_DIR).is_dir():
            raise TwostageError(f"{root}: has no {split}/{IMAGE_DIR} folder")
        return root / split
    if (root / IMAGE_DIR).is_dir():
        return root
    if root.name == IMAGE_DIR:
        return root.parent
    if (root / "train" / IMAGE_DIR).is_dir():
        return root / "train"
    if (root / "test" / IMAGE_DIR).is_dir():
        return root / "test"
    return root


def find_samples(root: str | os.PathLike, split: str | None = None) -> list[Sample]:
    """All PNGs under ROOT in sorted relative-path order, paired with their JSON if present.

    ROOT may be a dataset root (uses train/, else test/ unless `split` says), a split folder
    holding DCM/ (and outputs_json/), or any folder of PNGs (searched recursively, no JSON).
    """
    base = split_dir(root, split)
    image_root = base / IMAGE_DIR if (base / IMAGE_DIR).is_dir() else base
    json_root = base / JSON_DIR
    samples = []
    for p in sorted(image_root.rglob("*")):
        if p.suffix.lower() != ".png" or not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(image_root).as_posix()
        j = (json_root / rel).with_suffix(".json")
        samples.append(Sample(p, j if j.is_file() else None, rel))
    samples.sort(key=lambda s: s.rel)
    if not samples:
        raise TwostageError(f"{root}: no PNG images found")
    return samples


def parse_annotations(obj: object, source: str = "<json>") -> list[Annotation]:
    """Annotations from a loaded JSON object; malformed structure is a TwostageError naming `source`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list):
        raise TwostageError(f"{source}: no 'annotations' list")
    out = []
    for k, a in enumerate(obj["annotations"]):
        if not isinstance(a, dict) or "label" not in a or "points" not in a:
            raise TwostageError(f"{source}: annotation {k} lacks 'label' or 'points'")
        try:
            pts = np.asarray(a["points"], dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            raise TwostageError(f"{source}: annotation {k} ({a['label']}) has non-numeric points") from None
        if pts.size and not np.isfinite(pts).all():
            raise TwostageError(f"{source}: annotation {k} ({a['label']}) has NaN/infinite points")
        out.append(Annotation(str(a["label"]), np.rint(pts).astype(np.int32)))
    return out


def read_annotations(json_path: str | os.PathLike) -> list[Annotation]:
    """Read one §1 JSON file (label fixes are applied by the caller, see `load_annotations`)."""
    json_path = Path(json_path)
    try:
        obj = json.loads(json_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TwostageError(f"{json_path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TwostageError(f"{json_path}: invalid JSON ({e})") from None
    return parse_annotations(obj, str(json_path))


def annotations_to_json(annotations: Iterable[Annotation], filename: str, shape: tuple[int, int]) -> dict:
    """The §1 JSON object for a list of annotations (ids are running numbers)."""
    h, w = shape
    return {
        "annotations": [
            {"id": f"id-{i:04d}", "type": "poly_seg", "attributes": {}, "label": a.label,
             "points": np.asarray(a.points).astype(int).tolist()}
            for i, a in enumerate(annotations)
        ],
        "metadata": {"width": int(w), "height": int(h)},
        "filename": filename,
    }


def write_annotations(path: str | os.PathLike, annotations: Iterable[Annotation], filename: str,
                      shape: tuple[int, int], metadata: dict | None = None) -> None:
    """Write a §1 JSON file atomically. `metadata` overrides the (untrusted) metadata block."""
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
