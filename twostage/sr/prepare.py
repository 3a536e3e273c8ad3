"""`twostage prepare-sr`: turn a training set into the palm training set.

For every training image: the palm box from its carpal polygons (`twostage.box`), the
CONTEXT box (box side × `context`, same centre, inside the image) so palm training can
jitter the box inside the crop, the context crop upscaled (`twostage.sr.upscale`), every polygon
mapped into crop coordinates × scale and clipped to the crop.
Output: a palm set (`twostage.data.palm_set`: the layout, the record, the per-item manifests).

Resumable: an item whose manifest matches (source image hash, annotation hash, settings)
and whose outputs exist is skipped; anything else is redone. Every file is written
atomically. Images without carpal annotations are SKIPPED with a warning: their carpals are
almost surely unannotated rather than absent, and training on them would teach the palm
model to miss carpals. `shard=(i, n)` processes the i-th of n contiguous slices of the
sorted items (the `--shard` of every command); every shard writes the same palmset.json
(computed from all boxes). Shards of one setting may run in parallel into one folder; a run
of a shard already running there, or with other settings than a running one, is refused
(`io.locks.run_lock`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from .. import box as boxes
from ..data.annotations import Annotation, write_annotations
from ..data.fixes import load_annotations, select_samples
from ..data.layout import find_samples, parse_shard, shard_slice
from ..data.palm_set import FORMAT, PALMSET, SETTING_KEYS, item_paths, load_palm_set
from ..errors import TwostageError
from ..io.files import sha256_file, write_json_atomic, write_png_atomic
from ..io.images import png_size, read_image
from ..io.locks import describe_holder, other_holders, run_lock
from ..io.readers import read_json

log = logging.getLogger(__name__)

def _annotations_digest(annotations: list[Annotation]) -> str:
    """sha256 of the annotations after fixes: a changed JSON or fixes file redoes the item."""
    canon = [[a.label, np.asarray(a.points).astype(int).tolist()] for a in annotations]
    return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()


def _finished(manifest: Path, png: Path, js: Path, expect: dict) -> bool:
    if not (manifest.is_file() and png.is_file() and js.is_file()):
        return False
    try:
        got = read_json(manifest, "item manifest")
    except TwostageError:  # unreadable: redo the item
        return False
    return isinstance(got, dict) and all(got.get(k) == v for k, v in expect.items())


def map_annotations(annotations: list[Annotation], crop: boxes.Box, scale: int) -> list[Annotation]:
    """Every polygon in crop coordinates × scale, clipped to the crop; fully-outside ones dropped."""
    out = []
    for a in annotations:
        if len(a.points) < 3:
            continue
        pts = boxes.polygon_to_crop(a.points, crop, scale)
        if pts is not None:
            out.append(Annotation(a.label, pts, a.id))
    return out


def prepare_sr(data: str | os.PathLike, out: str | os.PathLike, upscaler: str = "bicubic", scale: int | None = None,
               margin: float = boxes.DEFAULT_MARGIN, context: float = 1.5, tile: int = 0, device: str = "cpu",
               shard: str | tuple[int, int] = (0, 1), overwrite: bool = False, fixes: str | os.PathLike | None = None,
               weights_dir: str | os.PathLike | None = None, trust_unpinned: bool = False,
               palm_input: int | list[int] | None = None) -> dict:
    """Write the palm training set of `data` into `out`; returns counts {done, skipped, no_carpals, dropped}.

    Args:
        data: dataset root (docs/DESIGN.md §1; its train split is used).
        out: PALMDATA folder (created).
        upscaler, scale, tile, device, weights_dir, trust_unpinned: see `twostage.sr.upscale.make_upscaler`
            (bicubic defaults to ×4; a network's scale is its own).
        margin: box margin (fraction of the carpal extent per side), see `twostage.box.BoxRule`.
        context: crop side / box side (>= 1); the crop lets training jitter the box.
        shard: "i/n" or (i, n): the i-th of n contiguous slices of the items (`data.shard_slice`).
        overwrite: allow replacing a palm set made with other settings in `out`.
        fixes: label-fixes YAML applied on read (dropped images are left out).
        palm_input: the palm network's input side these crops are for: a warning when it is
            below the native box side (`twostage.box.palm_input_warning`); None: no check.
    """
    from tqdm import tqdm

    from .upscale import make_upscaler

    i, n = parse_shard(shard)
    if not (isinstance(context, (int, float)) and context >= 1):
        raise TwostageError(f"context {context!r}: must be a number >= 1 (crop side / box side)")
    out, data = Path(out), Path(data)
    if out.resolve() == data.resolve():
        raise TwostageError(f"{out}: the output folder must differ from the dataset")
    rule = boxes.BoxRule(margin=margin)  # validates the margin
    up = make_upscaler(upscaler, scale=scale, tile=tile, device=device, weights_dir=weights_dir,
                       trust_unpinned=trust_unpinned)
    items, counts, split_ids = palm_items(data, rule, fixes)
    found, shapes = [b for *_, b in items], [shape for _, _, shape, _ in items]
    if palm_input is not None:
        warning = boxes.palm_input_warning([b.side for b in found], palm_input)
        if warning:
            log.warning("prepare-sr: %s", warning)
    # the record's rule: the fallback box and side range of ALL boxes (every shard writes the same)
    side_min, side_max = boxes.side_range_from_boxes(found, shapes)
    full_rule = boxes.BoxRule(margin=margin, side_min=side_min, side_max=side_max,
                              fallback=boxes.fallback_from_boxes(found, shapes))
    record = {"format": FORMAT, **up.record(), "margin": float(margin), "context": float(context),
              "box_rule": full_rule.to_dict(), "source": str(data.resolve()), "count": len(items),
              "split_ids": split_ids}
    settings = {k: record[k] for k in SETTING_KEYS}
    # shards run in parallel into one folder; the same shard twice, or other settings, is refused
    with run_lock(out, "twostage prepare-sr", tag=f"shard-{i}-of-{n}", info={"settings": settings}) as lock:
        clash = [h for h in other_holders(out, lock) if h.get("settings") != settings]
        if clash:
            raise TwostageError(f"{out}: {describe_holder(clash[0])} is writing a palm set with other settings "
                                "there; wait for it to end or use another --out")
        old = out / PALMSET
        if old.is_file() and not overwrite:
            prev = load_palm_set(out)
            diff = [f"{k}: {prev.get(k)!r} -> {settings[k]!r}" for k in SETTING_KEYS if prev.get(k) != settings[k]]
            if diff:
                raise TwostageError(f"{out}: holds a palm set made with other settings ({'; '.join(diff)}); "
                                    f"use another --out or pass --overwrite")
        write_json_atomic(old, record)

        for item in tqdm(shard_slice(items, (i, n)), desc=f"prepare-sr {i}/{n}" if n > 1 else "prepare-sr",
                         unit="img", disable=None):
            counts["done" if _write_item(out, item, up, context, settings) else "skipped"] += 1
    log.debug("prepare-sr: %d written, %d already done, %d without carpals, %d dropped by fixes -> %s",
              counts["done"], counts["skipped"], counts["no_carpals"], counts["dropped"], out)
    return counts


def palm_items(data: Path, rule: boxes.BoxRule, fixes) -> tuple[list, dict, list[str]]:
    """Pass 1 (cheap: JSON + PNG headers): (sample, annotations, shape, box) of every annotated
    training image with carpals, the counts of those left out, and the ID of every annotated
    image (the IDs palm training draws its folds over, as the global run does)."""
    split = "train" if (data / "train").is_dir() else None
    samples, fx = select_samples(data, split, fixes)
    counts = {"done": 0, "skipped": 0, "no_carpals": 0, "dropped": len(find_samples(data, split)) - len(samples)}
    items, split_ids = [], []  # split_ids: every annotated image's ID, as the global run draws its folds over
    for s in samples:
        if s.json_path is None:
            log.warning("%s: no annotation JSON; skipped", s.rel)
            continue
        split_ids.append(s.id)
        anns = load_annotations(s, fx)
        shape = png_size(s.image_path)
        b = boxes.box_from_annotations(anns, shape, rule)
        if b is None:
            log.warning("%s: no carpal annotation; skipped (its palm crop would teach missing carpals)", s.rel)
            counts["no_carpals"] += 1
            continue
        items.append((s, anns, shape, b))
    if not items:
        raise TwostageError(f"{data}: no training image with carpal annotations")
    return items, counts, split_ids


def _write_item(out: Path, item: tuple, up, context: float, settings: dict) -> bool:
    """One palm-set item (crop PNG, mapped JSON, manifest last); False if it was already done."""
    s, anns, shape, b = item
    png, js, man = item_paths(out, s)
    expect = {"source_sha256": sha256_file(s.image_path), "annotations_sha256": _annotations_digest(anns),
              **settings}
    if _finished(man, png, js, expect):
        return False
    crop_box = b.grown(context, shape)
    image = read_image(s.image_path)
    if image.shape != tuple(shape):
        raise TwostageError(f"{s.image_path}: decoded size {image.shape} differs from its header {shape}")
    crop = up(np.ascontiguousarray(boxes.crop_image(image, crop_box)))
    mapped = map_annotations(anns, crop_box, up.scale)
    write_png_atomic(png, crop)
    write_annotations(js, mapped, png.name, crop.shape)
    write_json_atomic(man, {**expect, "source": s.rel, "source_path": str(s.image_path.resolve()),
                            "image_shape": list(shape), "box": b.to_dict(), "context_box": crop_box.to_dict(),
                            "crop_shape": list(crop.shape)})
    return True
