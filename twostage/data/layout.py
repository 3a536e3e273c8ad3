"""The dataset layout of docs/DESIGN.md §1: finding images, reading/writing annotation JSON,
rasterising polygons into 29 independent binary masks.

Layout: ROOT/{train,test}/DCM/<ID>/<name>.png with ROOT/train/outputs_json/<ID>/<name>.json.
Images and JSON are paired by relative path and stem; `metadata`/`filename` inside the JSON
are never trusted (the PNG beside it is the truth).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..classes import CLASSES
from ..errors import TwostageError
from ..io import png_size, read_json, read_yaml, sha256_file, write_bytes_atomic, write_json_atomic

IMAGE_DIR = "DCM"
JSON_DIR = "outputs_json"
MAX_COORDINATE = 2**31 - 1
"""Largest |x| or |y| of a polygon point: points are stored as int32 (beyond it they would wrap)."""

log = logging.getLogger(__name__)


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
    id: str | None = None  # the JSON annotation "id", used by the fixes file


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


# --------------------------------------------------------------------------- label fixes

_IMAGE_KEYS = {"relabel", "drop", "drop_image"}
_RELABEL_KEYS = {"id", "index", "from", "to"}
_DROP_KEYS = {"id", "index", "label"}


def _image_key(key: str) -> str:
    """Normalised fixes key: posix path without a .png/.json suffix."""
    key = key.replace("\\", "/").strip("/")
    return key[: -len(Path(key).suffix)] if Path(key).suffix.lower() in (".png", ".json") else key


@dataclass(frozen=True)
class _Rule:
    kind: str  # "relabel" or "drop"
    id: str | None = None
    index: int | None = None
    label: str | None = None  # "from" for relabel, "label" for drop
    to: str | None = None

    def matches(self, k: int, a: Annotation) -> bool:
        return ((self.id is None or a.id == self.id) and (self.index is None or k == self.index)
                and (self.label is None or a.label == self.label))

    def describe(self) -> str:
        parts = [f"{n}={v}" for n, v in (("id", self.id), ("index", self.index),
                                         ("label", self.label), ("to", self.to)) if v is not None]
        return f"{self.kind}({', '.join(parts)})"


class Fixes:
    """Per-image label fixes from a YAML file: relabel / drop annotations / drop images.

    Format (every key optional; unknown keys and unknown target labels are errors)::

        # Label fixes, applied every time annotations are read; the data itself is never edited.
        # Keys are image basenames or paths relative to DCM/ (".png"/".json" optional).
        image1661130828152_R.png:
          relabel:                          # first matching rule wins; rules see the ORIGINAL labels,
            - {id: "id-0012", to: Pisiform} #   so swapping two labels is two rules
            - {index: 3, to: finger-3}      # index = position in the JSON "annotations" list (0-based)
            - {from: Trapezium, to: Trapezoid}   # every annotation labelled Trapezium
            - {id: "id-0007", from: Hamate, to: Capitate}  # both must match
          drop:
            - {id: "id-0031"}               # e.g. a sesamoid drawn as finger-3
            - {label: ring}                 # every annotation with this label
        ID007/image1661144206667_L.png:
          drop_image: true                  # leave this image out of training and scoring

    Drop rules are applied before relabel rules; a rule that matches nothing in its image is
    logged (the fixes file may be stale), and `twostage check --fixes` lists it.
    """

    def __init__(self, entries: dict[str, dict], source: str = "<fixes>") -> None:
        self.source = source
        self._raw: dict[str, str] = {}  # image key -> its parsed entry, canonical JSON
        self._rules: dict[str, list[_Rule]] = {}
        self._drop_image: set[str] = set()
        for key, entry in entries.items():
            self._add(str(key), entry)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Fixes":
        """Read and validate a fixes YAML file (TwostageError naming the file and the key)."""
        path = Path(path)
        obj = read_yaml(path, "fixes file")
        if obj is None:
            obj = {}
        if not isinstance(obj, dict):
            raise TwostageError(f"{path}: expected a mapping of image name -> fixes, got {type(obj).__name__}")
        return cls(obj, str(path))

    def _add(self, key: str, entry: object) -> None:
        where = f"{self.source}: {key}"
        if not isinstance(entry, dict):
            raise TwostageError(f"{where}: expected a mapping with relabel/drop/drop_image")
        unknown = set(entry) - _IMAGE_KEYS
        if unknown:
            raise TwostageError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; "
                                f"valid: {sorted(_IMAGE_KEYS)}")
        norm = _image_key(key)
        if norm in self._raw:
            raise TwostageError(f"{where}: image listed twice")
        rules = []
        for kind, valid in (("drop", _DROP_KEYS), ("relabel", _RELABEL_KEYS)):
            items = entry.get(kind) or []
            if not isinstance(items, list):
                raise TwostageError(f"{where}.{kind}: expected a list of rules")
            for n, r in enumerate(items):
                rules.append(self._rule(f"{where}.{kind}[{n}]", kind, r, valid))
        drop_image = entry.get("drop_image", False)
        if not isinstance(drop_image, bool):
            raise TwostageError(f"{where}.drop_image: expected true or false, got {drop_image!r}")
        if drop_image:
            self._drop_image.add(norm)
        # the entry as parsed (not as written: YAML may hold any value, even a self-referencing one)
        self._raw[norm] = json.dumps([drop_image, [astuple(r) for r in rules]])
        self._rules[norm] = rules

    @staticmethod
    def _rule(where: str, kind: str, r: object, valid: set[str]) -> _Rule:
        if not isinstance(r, dict) or not r:
            raise TwostageError(f"{where}: expected a mapping like {{id: ..., to: ...}}")
        unknown = set(r) - valid
        if unknown:
            raise TwostageError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; valid: {sorted(valid)}")
        index = r.get("index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
            raise TwostageError(f"{where}.index: expected an integer >= 0, got {index!r}")
        label = r.get("from" if kind == "relabel" else "label")
        rule = _Rule(kind, None if r.get("id") is None else str(r["id"]), index,
                     None if label is None else str(label),
                     None if r.get("to") is None else str(r["to"]))
        if kind == "relabel":
            if rule.to is None:
                raise TwostageError(f"{where}: relabel needs 'to'")
            if rule.to not in CLASSES:
                raise TwostageError(f"{where}.to: unknown label {rule.to!r}; valid: {', '.join(CLASSES)}")
        if rule.id is None and rule.index is None and rule.label is None:
            raise TwostageError(f"{where}: say which annotation (id, index or "
                                f"{'from' if kind == 'relabel' else 'label'})")
        return rule

    def _key_for(self, sample: Sample) -> str | None:
        for key in (_image_key(sample.rel), _image_key(sample.name)):
            if key in self._raw:
                return key
        return None

    def keys(self) -> list[str]:
        """The (normalised) image keys in the file."""
        return list(self._raw)

    def unmatched_keys(self, samples: Iterable[Sample]) -> list[str]:
        """Keys naming no image among `samples` (a typo or a stale fixes file)."""
        used = {self._key_for(s) for s in samples}
        return [k for k in self._raw if k not in used]

    def drops(self, sample: Sample) -> bool:
        """True if the fixes file leaves this image out (`drop_image: true`)."""
        return self._key_for(sample) in self._drop_image

    def keep(self, samples: Iterable[Sample]) -> list[Sample]:
        """`samples` without the dropped images."""
        return [s for s in samples if not self.drops(s)]

    def digest(self, sample: Sample) -> str:
        """Hash of this image's entry ("" if none): part of the mask-cache key."""
        key = self._key_for(sample)
        if key is None:
            return ""
        return hashlib.sha256(self._raw[key].encode()).hexdigest()

    def resolve(self, sample: Sample, annotations: Sequence[Annotation]) -> tuple[list[Annotation], list[str]]:
        """Apply this image's rules to annotations as read from its JSON (file order).

        Returns the fixed annotations and a description of each rule that matched nothing.
        """
        key = self._key_for(sample)
        rules = self._rules.get(key, []) if key is not None else []
        if not rules:
            return list(annotations), []
        used: set[_Rule] = set()
        out = []
        for k, a in enumerate(annotations):
            drop = next((r for r in rules if r.kind == "drop" and r.matches(k, a)), None)
            if drop is not None:
                used.add(drop)
                continue
            relabel = next((r for r in rules if r.kind == "relabel" and r.matches(k, a)), None)
            if relabel is not None:
                used.add(relabel)
                a = Annotation(relabel.to, a.points, a.id)
            out.append(a)
        return out, [r.describe() for r in rules if r not in used]

    def apply(self, sample: Sample, annotations: Sequence[Annotation]) -> list[Annotation]:
        """The fixed annotations; rules that matched nothing are logged as warnings."""
        out, unused = self.resolve(sample, annotations)
        for r in unused:
            log.warning("%s: fix %s for %s matched no annotation", self.source, r, sample.rel)
        return out


def select_samples(root: str | os.PathLike, split: str | None = None, fixes: "Fixes | str | os.PathLike | None" = None,
                   images: Iterable[str] | None = None) -> tuple[list[Sample], "Fixes | None"]:
    """The samples a command works on: `find_samples`, less the images the fixes drop, restricted
    to `images` (basenames or stems; an unknown one is an error). Returns them with the loaded fixes."""
    if fixes is not None and not isinstance(fixes, Fixes):
        fixes = Fixes.load(fixes)
    samples = find_samples(root, split)
    if fixes is not None:
        samples = fixes.keep(samples)
    if images:
        wanted = set(images)
        unknown = sorted(wanted - {s.name for s in samples} - {s.image_path.stem for s in samples})
        if unknown:
            raise TwostageError(f"{root}: no image named {', '.join(unknown)}")
        samples = [s for s in samples if s.name in wanted or s.image_path.stem in wanted]
    return samples, fixes


def parse_shard(spec: str | Sequence[int]) -> tuple[int, int]:
    """`"i/n"` or (i, n) → (i, n) with 0 ≤ i < n: the `--shard` of every command."""
    try:
        i, n = (int(x) for x in (spec.split("/") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise TwostageError(f"--shard {spec!r}: expected i/n, e.g. 0/4 (i is 0-based)") from None
    if n < 1 or not 0 <= i < n:
        raise TwostageError(f"--shard {i}/{n}: need 0 <= i < n (i is 0-based)")
    return i, n


def shard_slice(items: Sequence, shard: str | Sequence[int]) -> list:
    """The i-th of n contiguous, near-equal slices of `items` (sorted samples): shard outputs
    concatenated in shard order are the full output in sorted order (infer's CSVs)."""
    i, n = parse_shard(shard)
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return list(items[bounds[i]:bounds[i + 1]])


def load_annotations(sample: Sample, fixes: Fixes | None = None) -> list[Annotation]:
    """The annotations of a training sample with the label fixes applied.

    A test image (no JSON) or an image the fixes drop is a TwostageError: filter samples
    with `fixes.keep(samples)` first.
    """
    if sample.json_path is None:
        raise TwostageError(f"{sample.image_path}: no annotation JSON (test image?)")
    if fixes is not None and fixes.drops(sample):
        raise TwostageError(f"{sample.rel}: dropped by {fixes.source}; filter samples with fixes.keep()")
    annotations = read_annotations(sample.json_path)
    return fixes.apply(sample, annotations) if fixes is not None else annotations


# --------------------------------------------------------------------------- metadata

METADATA_NAMES = ("meta_data.csv", "meta_data.xlsx")
_COLUMN_ALIASES = {"나이": "age", "성별": "sex", "체중": "weight", "몸무게": "weight", "키": "height",
                   "신장": "height", "gender": "sex"}


def _column_name(name: object) -> str:
    """'  Weight (kg)' -> 'weight'; Korean headers of the original table -> English."""
    text = str(name or "").strip().lower()
    for alias, english in _COLUMN_ALIASES.items():
        if text.startswith(alias):
            return english
    text = text.split("(")[0].strip()
    return "_".join(text.replace("-", " ").split())


def _person_id(value: object) -> str:
    """Folder-style person ID: 'ID001' stays, numbers 1 / '1' / 1.0 become 'ID001'."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return f"ID{int(number):03d}" if number.is_integer() else text


def _cell(value: object) -> object:
    if not isinstance(value, str):
        return value
    text = value.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def load_metadata(root: str | os.PathLike) -> dict[str, dict]:
    """The optional per-person table (meta_data.csv or .xlsx at the dataset root), by ID.

    Column names are lower-cased with spaces as underscores ("Weight (kg)" -> "weight");
    numeric IDs become folder-style ("1" -> "ID001") so rows join `Sample.id`. Returns {} when
    there is no table. xlsx needs openpyxl (`pip install openpyxl` or `twostage[xlsx]`).
    """
    root = Path(root)
    candidates = [d / n for d in (root, root.parent) for n in METADATA_NAMES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return {}
    if path.suffix == ".csv":
        import csv

        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = [r for r in csv.reader(f)]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise TwostageError(f"{path}: cannot read metadata ({e})") from None
    else:
        try:
            import openpyxl
        except ImportError:
            raise TwostageError(f"{path}: reading .xlsx needs openpyxl: pip install openpyxl "
                                "(or twostage[xlsx]), or save the table as meta_data.csv") from None
        try:
            book = openpyxl.load_workbook(path, read_only=True, data_only=True)
            rows = [list(r) for r in book.worksheets[0].iter_rows(values_only=True)]
            book.close()
        except Exception as e:  # noqa: BLE001 - openpyxl raises many types for a bad file
            raise TwostageError(f"{path}: cannot read metadata ({e})") from None
    rows = [r for r in rows if any(c not in (None, "") for c in r)]
    if not rows:
        return {}
    header = [_column_name(c) for c in rows[0]]
    if "id" not in header:
        raise TwostageError(f"{path}: no ID column (columns: {', '.join(h for h in header if h)})")
    id_col = header.index("id")
    table: dict[str, dict] = {}
    for n, row in enumerate(rows[1:], start=2):
        if id_col >= len(row) or row[id_col] in (None, ""):
            continue
        pid = _person_id(row[id_col])
        if pid in table:
            raise TwostageError(f"{path}: row {n}: ID {pid} appears twice")
        table[pid] = {h: _cell(v) for h, v in zip(header, row) if h and h != "id"}
    return table


# --------------------------------------------------------------------------- mask cache

CACHE_FORMAT = 1  # bump when the rasteriser or the file layout changes


class MaskCache:
    """Rasterised masks on disk, so training does not re-rasterise polygons every epoch.

    One .npz per sample: the bounding box of each class and its bit-packed pixels, plus the
    key (JSON content hash, image size, this image's fixes, class list). A changed key, or a
    file that does not load, is rebuilt; concurrent writers are safe (atomic rename).
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.dir = Path(cache_dir)

    def path(self, sample: Sample) -> Path:
        where = hashlib.sha256(str(Path(sample.json_path or sample.image_path).resolve()).encode()).hexdigest()
        return self.dir / f"{sample.image_path.stem}-{where[:12]}.npz"

    @staticmethod
    def key(sample: Sample, shape: tuple[int, int], classes: Sequence[str], fixes: Fixes | None) -> str:
        if sample.json_path is None:
            raise TwostageError(f"{sample.image_path}: no annotation JSON (test image?)")
        h = hashlib.sha256()
        h.update(sha256_file(sample.json_path).encode())
        h.update(json.dumps([CACHE_FORMAT, list(shape), list(classes),
                             fixes.digest(sample) if fixes is not None else ""]).encode())
        return h.hexdigest()

    def get(self, sample: Sample, key: str) -> np.ndarray | None:
        """The cached (C, H, W) masks if present and made with `key`, else None."""
        path = self.path(sample)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    return None
                return _unpack_masks(z["shape"], z["boxes"], z["bits"])
        except Exception as e:  # noqa: BLE001 - any unreadable cache file is rebuilt, never fatal
            log.warning("%s: corrupt mask cache file, rebuilding (%s)", path, e)
            return None

    def put(self, sample: Sample, key: str, masks: np.ndarray) -> None:
        shape, boxes, bits = _pack_masks(masks)
        buf = io.BytesIO()
        np.savez(buf, key=np.array(key), shape=shape, boxes=boxes, bits=bits)
        write_bytes_atomic(self.path(sample), buf.getvalue())


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(C, 4) bounding box (y0, y1, x0, x1) of each class's non-zero pixels in (C, H, W)
    masks; all zero for an empty class. Bones cover a few % of an image: caches keep the boxes."""
    boxes = np.zeros((len(masks), 4), dtype=np.int64)
    for c, m in enumerate(masks):
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size:
            cols = np.flatnonzero(m[rows[0]:rows[-1] + 1].any(axis=0))
            boxes[c] = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
    return boxes


def _pack_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: bounding box (y0, y1, x0, x1) and the packed bits of that box."""
    boxes = mask_boxes(masks)
    parts = [np.packbits(m[y0:y1, x0:x1], axis=None) for m, (y0, y1, x0, x1) in zip(masks, boxes) if y1 > y0]
    bits = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return np.array(masks.shape, dtype=np.int64), boxes.astype(np.int32), bits


def _unpack_masks(shape: np.ndarray, boxes: np.ndarray, bits: np.ndarray) -> np.ndarray:
    masks = np.zeros(tuple(int(v) for v in shape), dtype=np.uint8)
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError("box table does not match the mask shape")
    offset = 0
    for c, (y0, y1, x0, x1) in enumerate(boxes):
        n = int((y1 - y0) * (x1 - x0))
        if n == 0:
            continue
        size = (n + 7) // 8
        if offset + size > bits.size:
            raise ValueError("bit stream too short")
        masks[c, y0:y1, x0:x1] = np.unpackbits(bits[offset:offset + size], count=n).reshape(y1 - y0, x1 - x0)
        offset += size
    return masks


def load_masks(sample: Sample, classes: Sequence[str] = CLASSES, fixes: Fixes | None = None,
               cache: MaskCache | None = None) -> np.ndarray:
    """(C, H, W) uint8 {0,1} masks of a training sample at its PNG size, fixes applied.

    With a `cache`, masks are read from disk when the JSON, the image size, this image's
    fixes and `classes` are unchanged, and rasterised (and stored) otherwise.
    """
    shape = png_size(sample.image_path)
    key = cache.key(sample, shape, classes, fixes) if cache is not None else ""
    if cache is not None:
        masks = cache.get(sample, key)
        if masks is not None:
            return masks
    masks = rasterize(load_annotations(sample, fixes), shape, classes)
    if cache is not None:
        cache.put(sample, key, masks)
    return masks
