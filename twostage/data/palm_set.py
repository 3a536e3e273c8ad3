"""The palm set on disk: what `prepare-sr` writes and palm training reads.

In the dataset layout (docs/DESIGN.md §1) so the same data layer reads it:

    PALMDATA/palmset.json                         # palm-set record: upscaler and weight sha256, box rule,
                                                  # context, split_ids (read by `load_palm_set`)
    PALMDATA/train/DCM/<ID>/<stem>.png            # upscaled context crop, 8-bit grayscale
    PALMDATA/train/outputs_json/<ID>/<stem>.json  # polygons in crop coordinates
    PALMDATA/manifest/<ID>/<stem>.json            # source + hashes, boxes, upscaler record;
                                                  # written LAST: its presence = item finished
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import TwostageError
from ..io.readers import read_json
from .layout import Sample

PALMSET = "palmset.json"
MANIFEST_DIR = "manifest"
FORMAT = "twostage-palmset-1"
SETTING_KEYS = ("upscaler", "scale", "weight_sha256", "margin", "context")
"""Settings that define a palm set: a folder holds one palm set; changing any needs --overwrite."""


def load_palm_set(root: str | os.PathLike) -> dict:
    """The palm-set record of a prepare-sr output folder (TwostageError if it is not one)."""
    p = Path(root) / PALMSET
    if not p.is_file():
        raise TwostageError(f"{root}: not a prepare-sr output (no {PALMSET}); run `twostage prepare-sr DATA --out {root}`")
    rec = read_json(p, "palm-set record")
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise TwostageError(f"{p}: not a {FORMAT} record")
    return rec


def item_paths(out: Path, sample: Sample) -> tuple[Path, Path, Path]:
    """Crop PNG, polygon JSON and manifest of one item; the manifest is written last."""
    rel = Path(sample.rel)
    return (out / "train" / "DCM" / rel, out / "train" / "outputs_json" / rel.with_suffix(".json"),
            out / MANIFEST_DIR / rel.with_suffix(".json"))


def read_item_manifest(palm_root: str | os.PathLike, sample: Sample) -> dict:
    """The per-item manifest of a palm-set sample (boxes in source px, hashes, upscaler record)."""
    p = Path(palm_root) / MANIFEST_DIR / Path(sample.rel).with_suffix(".json")
    try:
        rec = read_json(p, "palm-set item manifest")
    except TwostageError as e:
        raise TwostageError(f"{e}; re-run prepare-sr") from None
    if not isinstance(rec, dict):
        raise TwostageError(f"{p}: not a palm-set item manifest; re-run prepare-sr")
    return rec
