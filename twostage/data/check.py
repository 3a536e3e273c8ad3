"""`twostage check`: validate a dataset (docs/DESIGN.md §1) before training on it.

Everything a user can get wrong in the data is collected into one report instead of
failing on the first problem with a traceback. Errors make the data unusable (no images,
a corrupt PNG, an invalid JSON); warnings are listed grouped, with counts and the first
examples. The PNG is the truth for the image size (JSON metadata is never read).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..classes import CLASSES
from ..errors import TwostageError
from ..io.images import read_image_raw
from .annotations import read_annotations
from .fixes import Fixes
from .layout import IMAGE_DIR, JSON_DIR, Sample, find_samples
from .metadata import load_metadata

EXAMPLES = 5  # examples kept per problem

ERRORS = {
    "no_images": "no PNG images",
    "corrupt_png": "unreadable or corrupt PNG",
    "invalid_json": "invalid or malformed annotation JSON",
}
WARNINGS = {
    "image_without_json": "training image without annotation JSON (cannot be used for training)",
    "json_without_image": "annotation JSON without its image",
    "unknown_label": "label not among the 29 classes (ignored when rasterising)",
    "short_polygon": "polygon with fewer than 3 points (ignored when rasterising)",
    "points_outside": "polygon points outside the image (clipped when rasterising)",
    "duplicate_label": "label drawn more than once in one image",
    "missing_classes": "image without some of the 29 classes",
    "unexpected_size": "image size differs from the expected size",
    "mixed_sizes": "image size differs from the most common size",
    "sixteen_bit": "16-bit PNG (read scaled to 8 bits)",
    "alpha_channel": "PNG with an alpha channel (alpha ignored)",
    "colour_image": "colour PNG with differing channels (first channel used)",
    "fixes_unknown_image": "fixes file names an image that is not in the dataset",
    "fixes_unused_rule": "fixes rule that matches no annotation",
    "metadata_unreadable": "metadata table cannot be read",
    "metadata_missing_id": "person ID without a row in the metadata table",
}


@dataclass
class Problem:
    """One kind of problem: how often it occurred and the first examples."""

    code: str
    description: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"code": self.code, "description": self.description, "count": self.count,
                "examples": self.examples}


@dataclass
class CheckReport:
    """What `check_dataset` found: per-split counts, sizes, grouped errors and warnings."""

    root: str
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    sizes: Counter = field(default_factory=Counter)
    errors: dict[str, Problem] = field(default_factory=dict)
    warnings: dict[str, Problem] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing makes the data unusable (warnings allowed)."""
        return not self.errors

    def add(self, code: str, example: str, count: int = 1) -> None:
        """Record one occurrence of problem `code` (a key of ERRORS or WARNINGS)."""
        group, table = (self.errors, ERRORS) if code in ERRORS else (self.warnings, WARNINGS)
        problem = group.setdefault(code, Problem(code, table[code]))
        problem.count += count
        if len(problem.examples) < EXAMPLES:
            problem.examples.append(example)

    def to_dict(self) -> dict:
        return {
            "root": self.root, "ok": self.ok, "splits": self.splits,
            "sizes": {f"{h}x{w}": n for (h, w), n in self.sizes.most_common()},
            "errors": [p.to_dict() for p in self.errors.values()],
            "warnings": [p.to_dict() for p in self.warnings.values()],
        }

    def text(self) -> str:
        """Human-readable summary for the terminal."""
        lines = [f"dataset {self.root}"]
        for split, counts in self.splits.items():
            lines.append(f"  {split}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
        if self.sizes:
            lines.append("  sizes (HxW): " + ", ".join(f"{h}x{w} ×{n}" for (h, w), n in self.sizes.most_common()))
        for title, group in (("ERRORS (data unusable until fixed)", self.errors), ("WARNINGS", self.warnings)):
            if not group:
                continue
            lines.append(title)
            for p in group.values():
                lines.append(f"  {p.code} ×{p.count}: {p.description}")
                lines.extend(f"      {e}" for e in p.examples)
                if p.count > len(p.examples):
                    lines.append(f"      … {p.count - len(p.examples)} more")
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {sum(p.count for p in self.errors.values())} error(s), "
                     f"{sum(p.count for p in self.warnings.values())} warning(s)")
        return "\n".join(lines)


def _split_dirs(root: Path) -> list[tuple[str, Path]]:
    """(name, folder holding DCM/) for each split to check."""
    if (root / IMAGE_DIR).is_dir():
        return [(root.name, root)]
    return [(s, root / s) for s in ("train", "test") if (root / s / IMAGE_DIR).is_dir()]


def _check_image(report: CheckReport, sample: Sample, where: str) -> tuple[int, int] | None:
    """Decode the PNG; record corruption, bit depth, alpha, colour. Returns (H, W) or None."""
    try:
        img = read_image_raw(sample.image_path)
    except TwostageError as e:
        report.add("corrupt_png", f"{where}: {str(e).split(': ', 1)[-1]}")
        return None
    if img.dtype == np.uint16:
        report.add("sixteen_bit", where)
    elif img.dtype != np.uint8:
        report.add("corrupt_png", f"{where}: unsupported pixel type {img.dtype}")
        return None
    if img.ndim == 3:
        if img.shape[2] == 4:
            report.add("alpha_channel", where)
        if img.shape[2] >= 3 and not (np.array_equal(img[..., 0], img[..., 1])
                                      and np.array_equal(img[..., 0], img[..., 2])):
            report.add("colour_image", where)
    return img.shape[0], img.shape[1]


def _check_annotations(report: CheckReport, sample: Sample, where: str, shape: tuple[int, int] | None,
                       fixes: Fixes | None, image_where: str) -> None:
    """Problems of the JSON are named by `where`, the JSON file (what the user edits); unused
    fixes rules by `image_where`, the image (fixes files are keyed by image)."""
    try:
        annotations = read_annotations(sample.json_path)
    except TwostageError as e:
        report.add("invalid_json", f"{where}: {str(e).split(': ', 1)[-1]}")
        return
    if fixes is not None:
        annotations, unused = fixes.resolve(sample, annotations)
        for rule in unused:
            report.add("fixes_unused_rule", f"{image_where}: {rule}")
    labels = Counter()
    for k, a in enumerate(annotations):
        name = f"{where}: annotation {k} ({a.label})"
        if a.label not in CLASSES:
            report.add("unknown_label", f"{where}: {a.label!r}")
        labels[a.label] += 1
        if len(a.points) < 3:
            report.add("short_polygon", f"{name}: {len(a.points)} point(s)")
        if shape is not None and len(a.points):
            h, w = shape
            x, y = a.points[:, 0], a.points[:, 1]
            outside = int(((x < 0) | (x >= w) | (y < 0) | (y >= h)).sum())
            if outside:
                report.add("points_outside", f"{name}: {outside} of {len(a.points)} points outside {h}x{w}")
    for label, n in labels.items():
        if n > 1:
            report.add("duplicate_label", f"{where}: {label} ×{n}")
    missing = [c for c in CLASSES if c not in labels]
    if missing:
        shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6})" if len(missing) > 6 else "")
        report.add("missing_classes", f"{where}: {shown}")


def _orphan_jsons(base: Path, samples: list[Sample]) -> list[str]:
    """JSON files under outputs_json/ with no PNG of the same relative path and stem."""
    json_root = base / JSON_DIR
    if not json_root.is_dir():
        return []
    have = {Path(s.rel).with_suffix("").as_posix() for s in samples}
    return [p.relative_to(json_root).as_posix() for p in sorted(json_root.rglob("*.json"))
            if p.relative_to(json_root).with_suffix("").as_posix() not in have]


def check_dataset(root: str | os.PathLike, fixes: Fixes | str | os.PathLike | None = None,
                  expected_size: int | tuple[int, int] | None = None) -> CheckReport:
    """Check every split (train/, test/) of a dataset and return the findings.

    Args:
        root: dataset root (or one split folder holding DCM/).
        fixes: a Fixes object or the path of a fixes YAML file, applied before label checks.
        expected_size: side (square) or (H, W) every image should have; without it, images
            that differ from the most common size are reported.
    Raises TwostageError only when `root` does not exist or the fixes file is invalid.
    """
    from tqdm import tqdm

    root = Path(root)
    if not root.is_dir():
        raise TwostageError(f"{root}: no such folder")
    if fixes is not None and not isinstance(fixes, Fixes):
        fixes = Fixes.load(fixes)
    if isinstance(expected_size, int):
        expected_size = (expected_size, expected_size)
    report = CheckReport(str(root))
    splits = _split_dirs(root)
    if not splits:
        report.add("no_images", f"{root}: no train/{IMAGE_DIR} or test/{IMAGE_DIR} folder")
        return report
    sizes: dict[str, tuple[int, int]] = {}
    all_samples: list[Sample] = []
    for split, base in splits:
        try:
            samples = find_samples(base)
        except TwostageError:
            report.add("no_images", f"{split}: no PNG images under {base / IMAGE_DIR}")
            continue
        all_samples += samples
        expects_json = split != "test" and ((base / JSON_DIR).is_dir() or split == "train")
        counts = Counter(images=len(samples))
        for sample in tqdm(samples, desc=f"check {split}", unit="img", disable=None):
            where = f"{split}/{sample.rel}"
            shape = _check_image(report, sample, where)
            if shape is not None:
                sizes[where] = shape
                if expected_size is not None and shape != tuple(expected_size):
                    report.add("unexpected_size", f"{where}: {shape[0]}x{shape[1]}, "
                                                  f"expected {expected_size[0]}x{expected_size[1]}")
            if not expects_json:
                continue
            if sample.json_path is None:
                report.add("image_without_json", where)
                continue
            counts["annotated"] += 1
            if fixes is not None and fixes.drops(sample):
                counts["dropped by fixes"] += 1
                continue
            json_where = f"{split}/{sample.json_path.relative_to(base).as_posix()}"
            _check_annotations(report, sample, json_where, shape, fixes, where)
        for rel in _orphan_jsons(base, samples):
            report.add("json_without_image", f"{split}/{JSON_DIR}/{rel}")
        report.splits[split] = dict(counts)
    report.sizes = Counter(sizes.values())
    if expected_size is None and len(report.sizes) > 1:
        common = report.sizes.most_common(1)[0][0]
        for where, shape in sizes.items():
            if shape != common:
                report.add("mixed_sizes", f"{where}: {shape[0]}x{shape[1]}, most are {common[0]}x{common[1]}")
    if fixes is not None:
        for key in fixes.unmatched_keys(all_samples):
            report.add("fixes_unknown_image", f"{fixes.source}: {key}")
    _check_metadata(report, root, all_samples)
    return report


def _check_metadata(report: CheckReport, root: Path, samples: list[Sample]) -> None:
    try:
        table = load_metadata(root)
    except TwostageError as e:
        report.add("metadata_unreadable", str(e))
        return
    if table:
        for pid in sorted({s.id for s in samples} - set(table)):
            report.add("metadata_missing_id", pid)
