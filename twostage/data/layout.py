"""The dataset layout of docs/DESIGN.md §1: which images a data root holds, in which order, and
the `--shard` slice of them.

Layout: ROOT/{train,test}/DCM/<ID>/<name>.png with ROOT/train/outputs_json/<ID>/<name>.json.
Images and JSON are paired by relative path and stem; `metadata`/`filename` inside the JSON
are never trusted (the PNG beside it is the truth).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import TwostageError

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
