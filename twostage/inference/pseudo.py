"""`twostage pseudo-label`: predictions on unlabelled images → annotations in the dataset layout (docs/DESIGN.md §1),
so train, check and evaluate read them like hand-drawn ones (docs/DESIGN.md §4, "Pseudo-labels").

Masks become polygons (`masks_to_annotations`): one polygon per 8-connected component, from
its OpenCV contour; each hole hangs from the contour above it by a vertical cut through the
foreground, walked down and back up, so the one polygon, filled alone as `data.rasterize`
fills it, leaves the hole empty. The round trip mask → polygons → `rasterize` is exact.

Predictions come from a submission CSV (any model, fusion or ensemble) or from checkpoints run
through `chain.TwoStage` (`infer.predictions`). With probabilities (the chain's, or
`infer --save-probs` files next to a CSV) each class and image gets a confidence, and
`min_confidence` leaves out what is below it. OUT/pseudo.json records the source, the
confidences and what was left out; its presence marks the folder as pseudo-labelled.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..classes import CLASSES
from ..data.annotations import Annotation, write_annotations
from ..data.layout import IMAGE_DIR, JSON_DIR, Sample
from ..data.pseudo_record import PSEUDO_RECORD, RECORD_FORMAT
from ..errors import TwostageError, first_few
from ..io.files import check_new_dir, make_dir, sha256_file, staging_dir, write_error, write_json_atomic
from ..io.images import png_size
from ..io.locks import run_lock

log = logging.getLogger(__name__)

POSITIVE = 0.5
"""A pixel counts as predicted for the confidence when p >= POSITIVE, whatever thresholds made
the masks, so confidences of different runs compare."""


# --------------------------------------------------------------------------- masks → polygons

def masks_to_annotations(masks: Any, classes: Sequence[str] = CLASSES) -> list[Annotation]:
    """Polygons of (C, H, W) masks (nonzero = foreground), one per connected component, with
    `rasterize(masks_to_annotations(m), (H, W)) == m`; an empty class gives none."""
    if len(masks) != len(classes):
        raise ValueError(f"{len(masks)} mask channels for {len(classes)} classes")
    return [Annotation(label, points) for label, mask in zip(classes, masks) for points in mask_polygons(mask)]


def mask_polygons(mask: Any) -> list[np.ndarray]:
    """(N, 2) int32 x,y polygons of one (H, W) mask, one per 8-connected component, each filled
    alone by `cv2.fillPoly` giving back exactly that component, holes included. Every polygon
    has at least 3 points (`rasterize` skips shorter ones): a 1- or 2-pixel component repeats them."""
    import cv2

    mask = np.asarray(mask) != 0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not rows.size:
        return []
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.zeros((y1 - y0 + 2, x1 - x0 + 2), np.uint8)  # a zero border: every walk up ends on background
    crop[1:-1, 1:-1] = mask[y0:y1, x0:x1]
    contours, hierarchy = cv2.findContours(crop, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    tree = hierarchy[0]  # RETR_CCOMP: [next, previous, first child, parent]; children are holes
    offset = np.array([x0 - 1, y0 - 1])
    polygons = []
    for i, outer in enumerate(contours):
        if tree[i][3] != -1:
            continue
        holes, j = [], tree[i][2]
        while j != -1:
            holes.append(contours[j].reshape(-1, 2))
            j = tree[j][0]
        path = _join_holes(outer.reshape(-1, 2), holes, crop)
        polygons.append((_corners(path) + offset).astype(np.int32))
    return polygons


def _join_holes(outer: np.ndarray, holes: list[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """One closed path through the outer contour and every hole contour (unit steps).

    A hole's topmost pixel is joined to the first pixel below background straight above it:
    a foreground column, so the cut walked down and back up fills only foreground. That pixel
    lies on the outer contour or on a hole whose top is higher (its background is above it):
    holes are joined top first, each to the earliest ring holding the pixel, so the joins
    form a tree rooted at the outer contour, walked depth first."""
    if not holes:
        return outer
    rings = [outer] + sorted(holes, key=lambda h: int(h[:, 1].min()))
    width = mask.shape[1]
    points = np.concatenate(rings).astype(np.int64)
    ring_of = np.repeat(np.arange(len(rings)), [len(r) for r in rings])
    index_in = np.concatenate([np.arange(len(r)) for r in rings])
    keys = points[:, 1] * width + points[:, 0]
    order = np.lexsort((ring_of, keys))  # by pixel, then ring: the first hit is the earliest ring
    sorted_keys = keys[order]
    start = [0] * len(rings)  # where each ring's walk begins: a hole's top pixel
    children: list[list[tuple[int, int, np.ndarray]]] = [[] for _ in rings]
    for r in range(1, len(rings)):
        ring = rings[r]
        top = int(np.lexsort((ring[:, 0], ring[:, 1]))[0])
        x, y = (int(v) for v in ring[top])
        y_end = y - int(np.argmin(mask[:y, x][::-1]))  # the highest pixel of the foreground run above
        k = int(np.searchsorted(sorted_keys, y_end * width + x))
        if k == len(keys) or sorted_keys[k] != y_end * width + x or ring_of[order[k]] >= r:
            raise RuntimeError(f"hole at ({x}, {y}): no earlier contour at ({x}, {y_end})")  # a broken invariant
        parent = int(ring_of[order[k]])
        start[r] = top
        cut = np.stack([np.full(y - y_end + 1, x), np.arange(y_end, y + 1)], axis=1)
        children[parent].append((int(index_in[order[k]]), r, cut))
    for r, kids in enumerate(children):
        kids.sort(key=lambda kid: (kid[0] - start[r]) % len(rings[r]))

    def walk(r: int, a: int, b: int) -> np.ndarray:
        """Points a..b-1 of ring r's walk (a hole's walk ends back on its top pixel)."""
        return rings[r][(start[r] + np.arange(a, b)) % len(rings[r])]

    pieces: list[np.ndarray] = []
    stack: list[list] = [[0, 0, 0, None]]  # ring, next point of its walk, next child, the cut back up
    while stack:
        frame = stack[-1]
        r, pos, kid, back = frame
        if kid < len(children[r]):
            index, child, cut = children[r][kid]
            at = (index - start[r]) % len(rings[r])
            pieces += [walk(r, pos, at + 1), cut]
            frame[1], frame[2] = at + 1, kid + 1
            stack.append([child, 0, 0, cut[::-1]])
        else:
            pieces.append(walk(r, pos, len(rings[r]) + (r > 0)))
            if back is not None:
                pieces.append(back)
            stack.pop()
    return np.concatenate(pieces)


def _corners(path: np.ndarray) -> np.ndarray:
    """A closed unit-step path without repeated points and without the points inside straight
    runs (what CHAIN_APPROX_SIMPLE keeps), at least 3 points long."""
    keep = np.any(path != np.roll(path, -1, axis=0), axis=1)
    path = path[keep] if keep.any() else path[:1]
    step = np.roll(path, -1, axis=0) - path
    keep = np.any(step != np.roll(step, 1, axis=0), axis=1)
    path = path[keep] if keep.any() else path[:1]
    return np.resize(path, (max(3, len(path)), 2))


# --------------------------------------------------------------------------- confidence

def class_confidence(probs: Any) -> np.ndarray:
    """(C,) confidence of (C, H, W) probabilities (numpy or torch, any device): per class the
    mean p over the pixels with p >= POSITIVE, or 1 - max p where there are none (how sure the
    class is absent)."""
    probs = torch.as_tensor(probs)
    out = np.empty(len(probs))
    for c, p in enumerate(probs):
        positive = p >= POSITIVE
        out[c] = float(p[positive].mean()) if bool(positive.any()) else 1.0 - float(p.max())
    return out


# --------------------------------------------------------------------------- pseudo-label

@dataclass
class PseudoResult:
    """What a pseudo-label run wrote and left out."""

    out: str                     # the dataset root: OUT/train/DCM, OUT/train/outputs_json
    record: str                  # OUT/pseudo.json
    images: int                  # images written
    dropped_images: list[str] = field(default_factory=list)        # below min_confidence, not written
    dropped_classes: dict[str, list[str]] = field(default_factory=dict)  # image -> classes not written
    ignored_csv_images: list[str] = field(default_factory=list)    # CSV rows for images not in IMAGES
    seconds: float = 0.0


Prediction = tuple[Sample, np.ndarray, "torch.Tensor | np.ndarray | None"]
"""(sample, (C, H, W) masks, (C, H, W) probabilities or None) of one image."""


def pseudo_label(images: str | os.PathLike, out: str | os.PathLike, *, csv: str | os.PathLike | None = None,
                 global_ckpt: str | os.PathLike | None = None, palm_ckpt: str | os.PathLike | None = None,
                 fuse: bool = False, probs: str | os.PathLike | None = None, min_confidence: float | None = None,
                 copy: bool = False, split: str | None = None, **options) -> PseudoResult:
    """Write the predictions of IMAGES as a training set at OUT, with OUT/pseudo.json.

    Args:
        images: a folder of PNGs or a dataset root, as `infer` reads it (`split` picks one).
        out: an absent or empty folder; it appears complete or not at all (written beside it,
            then renamed).
        csv: a prediction CSV with a row for every image and class (rows for other images
            are ignored, with a warning).
        global_ckpt, palm_ckpt, fuse: or predict with checkpoints, exactly as `infer` does.
        probs: with `csv`, the `infer --save-probs` folder of the same predictions, for the
            confidence.
        min_confidence: 0 < T < 1: leave out the classes whose confidence is below T (listed
            in pseudo.json `dropped_classes`) and the images whose mean class confidence is.
        copy: copy the PNGs instead of linking to them (the originals are never modified).
        options: `chain.ChainOptions` fields (device, tta, thresholds, ...), checkpoints only.
    """
    from .infer import find_images

    t0 = time.perf_counter()
    _check_arguments(csv, global_ckpt, palm_ckpt, fuse, probs, min_confidence)
    out = Path(out)
    check_new_dir(out)
    samples = find_images(images, split)
    result = PseudoResult(out=str(out), record=str(out / PSEUDO_RECORD), images=0)
    if csv is not None:
        source, predicted = _csv_predictions(images, samples, csv, probs, options, result)
    else:
        source, predicted = _chain_predictions(samples, global_ckpt, palm_ckpt, fuse, options)
    confidence: dict[str, dict] | None = None if csv is not None and probs is None else {}
    record = {"format": RECORD_FORMAT, "source": source, "images": 0, "classes": list(CLASSES),
              "confidence": confidence, "dropped_images": result.dropped_images,
              "dropped_classes": result.dropped_classes, "min_confidence": min_confidence}

    with run_lock(out, "twostage pseudo-label"), staging_dir(out) as tmp, contextlib.closing(predicted):
        _write_samples(predicted, len(samples), tmp, copy, min_confidence, confidence, result)
        record["images"] = result.images
        write_json_atomic(tmp / PSEUDO_RECORD, record)
    result.seconds = time.perf_counter() - t0
    return result


def _csv_predictions(images, samples: list[Sample], csv: str | os.PathLike, probs, options: dict,
                     result: PseudoResult) -> tuple[dict, Iterator[Prediction]]:
    """The source record and the predictions of a CSV (with `probs`, its saved probabilities),
    checked in full first; the CSV's images not in `samples` go to `result.ignored_csv_images`."""
    from .chain import refuse_chain_options

    refuse_chain_options(options)
    rows, result.ignored_csv_images = _csv_rows(csv, samples)
    if result.ignored_csv_images:
        log.warning("%s: %d image(s) not under %s, ignored: %s", csv, len(result.ignored_csv_images), images,
                    first_few(result.ignored_csv_images))
    prob_files = _probs_files(probs, samples) if probs is not None else None
    source = {"csv": str(Path(csv).resolve()), "sha256": sha256_file(csv)}
    if probs is not None:
        source["probs"] = str(Path(probs).resolve())
    return source, _from_csv(samples, rows, prob_files)


def _chain_predictions(samples: list[Sample], global_ckpt, palm_ckpt, fuse: bool, options: dict
                       ) -> tuple[dict, Iterator[Prediction]]:
    """The source record and the predictions of the chain built from the checkpoints."""
    from .chain import TwoStage

    if palm_ckpt is not None and not fuse:
        log.info("--palm given without --fuse: running the global model alone")
    chain = TwoStage.build(global_ckpt, palm_ckpt if fuse else None, **options)
    return _chain_source(chain, global_ckpt, palm_ckpt if fuse else None), _from_chain(chain, samples)


def _write_samples(predicted: Iterator[Prediction], total: int, tmp: Path, copy: bool, min_confidence: float | None,
                   confidence: dict[str, dict] | None, result: PseudoResult) -> None:
    """Write each prediction's image and annotations under `tmp`, its confidence into
    `confidence`; what is below `min_confidence` is left out and listed in `result`."""
    from tqdm import tqdm

    for sample, masks, p in tqdm(predicted, total=total, desc="pseudo-label", unit="img", disable=None):
        masks = np.asarray(masks, dtype=np.uint8)
        if p is not None:
            scores = class_confidence(p)
            confidence[sample.rel] = {"image": round(float(scores.mean()), 6),
                                      "classes": {c: round(float(v), 6) for c, v in zip(CLASSES, scores)}}
        del p
        if min_confidence is not None:
            if scores.mean() < min_confidence:
                result.dropped_images.append(sample.rel)
                continue
            low = scores < min_confidence
            if low.any():
                result.dropped_classes[sample.rel] = [c for c, drop in zip(CLASSES, low) if drop]
                masks[low] = 0
        _place_image(sample.image_path, tmp / "train" / IMAGE_DIR / sample.rel, copy)
        write_annotations((tmp / "train" / JSON_DIR / sample.rel).with_suffix(".json"),
                          masks_to_annotations(masks), sample.name, masks.shape[1:])
        result.images += 1
    if not result.images:
        best = max(v["image"] for v in confidence.values())
        raise TwostageError(f"every image is below --min-confidence {min_confidence} (the best image "
                            f"confidence is {best}); nothing written")


def _check_arguments(csv, global_ckpt, palm_ckpt, fuse: bool, probs, min_confidence) -> None:
    if (csv is None) == (global_ckpt is None):
        raise TwostageError("give either a prediction CSV (--csv) or a global checkpoint (--global)")
    if csv is not None and (palm_ckpt is not None or fuse):
        raise TwostageError("--palm and --fuse apply to checkpoints (--global), not --csv")
    if fuse and palm_ckpt is None:
        raise TwostageError("--fuse needs a palm checkpoint (--palm CKPT)")
    if probs is not None and csv is None:
        raise TwostageError("--probs goes with --csv (the probabilities of the CSV's predictions); "
                            "checkpoints give their own")
    if min_confidence is None:
        return
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) \
            or not math.isfinite(min_confidence) or not 0 < min_confidence < 1:
        raise TwostageError(f"--min-confidence {min_confidence}: must be a number between 0 and 1 (exclusive)")
    if csv is not None and probs is None:
        raise TwostageError("--min-confidence needs probabilities: a CSV has none; give --probs DIR (the "
                            "`infer --save-probs` folder of the same run) or predict with --global")


def _csv_rows(csv: str | os.PathLike, samples: list[Sample]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The CSV's rows for `samples`, checked in full before anything is written: every image
    and class present, every RLE well-formed for its image's size. Also the CSV's other images."""
    from ..rle import decode, read_csv

    rows = read_csv(csv)
    unknown = sorted({c for r in rows.values() for c in r if c not in CLASSES})
    if unknown:
        raise TwostageError(f"{csv}: unknown class name(s) {first_few(unknown)}")
    missing = [s.name for s in samples if s.name not in rows]
    if missing:
        raise TwostageError(f"{csv}: no rows for {len(missing)} of the {len(samples)} image(s): {first_few(missing)}")
    for s in samples:
        absent = [c for c in CLASSES if c not in rows[s.name]]
        if absent:
            raise TwostageError(f"{csv}: image {s.name} has no row for class(es) {first_few(absent)}; "
                                "pseudo-labels need every class")
        shape = png_size(s.image_path)
        for c in CLASSES:
            try:
                decode(rows[s.name][c], shape)
            except TwostageError as e:
                raise TwostageError(f"{csv}: image {s.name} class {c}: {e}") from None
    names = {s.name for s in samples}
    return {n: r for n, r in rows.items() if n in names}, sorted(n for n in rows if n not in names)


def _probs_files(folder: str | os.PathLike, samples: list[Sample]) -> list[Path]:
    """Each sample's saved-probabilities file (`probs.probs_file_name`), holding all CLASSES."""
    from .probs import probs_classes, probs_file_name

    folder = Path(folder)
    if not folder.is_dir():
        raise TwostageError(f"{folder}: no such probabilities folder (write one with `twostage infer --save-probs`)")
    files = [folder / probs_file_name(s.name) for s in samples]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise TwostageError(f"{folder}: no probabilities for {len(missing)} of the {len(samples)} image(s): "
                            f"{first_few(missing)}")
    for f in files:
        classes = probs_classes(f)
        if sorted(classes) != sorted(CLASSES):
            raise TwostageError(f"{f}: holds {len(classes)} class(es); the confidence needs all {len(CLASSES)}")
    return files


def _from_csv(samples: list[Sample], rows: dict[str, dict[str, str]], prob_files: list[Path] | None
              ) -> Iterator[Prediction]:
    from ..rle import decode
    from .probs import read_probs

    for k, s in enumerate(samples):
        shape = png_size(s.image_path)
        masks = np.stack([decode(rows[s.name][c], shape) for c in CLASSES])
        p = None
        if prob_files is not None:
            classes, p = read_probs(prob_files[k])
            if p.shape[1:] != shape:
                raise TwostageError(f"{prob_files[k]}: probabilities of {p.shape[2]}x{p.shape[1]}, "
                                    f"the image {s.name} is {shape[1]}x{shape[0]}")
            if classes != list(CLASSES):
                p = p[[classes.index(c) for c in CLASSES]]
        yield s, masks, p


def _from_chain(chain, samples: list[Sample]) -> Iterator[Prediction]:
    from .infer import predictions

    with contextlib.closing(predictions(chain, samples, fuse=chain.palm is not None)) as results:
        for sample, seg, native in results:
            probs = chain.full_probs(native, tuple(seg.masks.shape[-2:]), seg)
            masks = seg.masks.cpu().numpy()
            del seg, native
            yield sample, masks, probs
            del probs


def _chain_source(chain, global_ckpt, palm_ckpt) -> dict:
    """The checkpoints (and their sha256) and the settings that made the masks."""
    from ..checkpoint import checkpoint_file

    source: dict[str, Any] = {"fuse": palm_ckpt is not None}
    for key, ckpt in (("global", global_ckpt), ("palm", palm_ckpt)):
        path = None if ckpt is None else checkpoint_file(ckpt)
        source[key] = None if path is None else str(path.resolve())
        source[f"{key}_sha256"] = None if path is None else sha256_file(path)
    source.update(calibration=chain.calibrated_by, tta=chain.options.tta, scales=list(chain.options.scales),
                  thresholds={c: round(float(t), 6) for c, t in zip(CLASSES, chain.thr.cpu().tolist())})
    return source


def _place_image(src: Path, dst: Path, copy: bool) -> None:
    """`dst` as a link to the source PNG (absolute, so the folder may move) or a byte copy."""
    make_dir(dst.parent)
    try:
        if copy:
            shutil.copyfile(src, dst)
        else:
            os.symlink(src.resolve(), dst)
    except OSError as e:
        if copy:
            raise write_error(dst, e) from None
        raise TwostageError(f"{dst}: cannot link to {src} ({e.strerror or e}); use --copy") from None
