"""`twostage infer`: images → global probabilities → (palm box → crop → upscale → palm
probabilities → fusion) → per-class thresholds → RLE CSV (docs/DESIGN.md §2, §3).

Everything from the image tensor to the RLE boundaries runs on the model's device, batched
over the classes. The global probabilities stay at the network's size: the palm box is
found there, `upsample.threshold_upsample` upsamples only the source-size tiles that can
cross a threshold (a bone covers a few per cent of a radiograph), and the palm box region of
the palm channels is upsampled on its own, blended (`fusion.blend_box`) and thresholded
(`segment`). No 29-class source-size float stack exists unless `--save-probs` asks for one.
Only the crop-size uint8 palm crop goes through the CPU, because upscalers take and return
numpy images. The CSV is streamed through `twostage.rle.CsvWriter`, so it appears only
when every image succeeded.

The palm checkpoint carries how its training crops were made (box rule with fallback and
side range, upscaler name, scale and weight sha256); inference rebuilds exactly that and
refuses to run with anything else (a model trained on Real-ESRGAN crops is never silently
fed bicubic crops).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import fusion
from .classes import CLASSES, PALM_INDICES, class_indices
from .data import Sample, find_samples
from .devices import torch_device
from .errors import TwostageError
from .fusion import DEFAULT_FEATHER, PerClassSpec
from .io import atomic_path, read_image
from .models import Predictor, resize_images
from .upsample import threshold_upsample, upsample_region

log = logging.getLogger(__name__)

BOX_ROWS = 64
"""Rows of the palm box upsampled and blended per step."""

PALM_RESIZE_MODES = ("bilinear", "area")
"""How palm probabilities at the palm model's input size are resized to the box size."""

STAGES = ("read", "global", "box_crop", "masks", "upscale", "palm", "fusion", "save_probs", "rle_write")
"""Timed steps of the pipeline, reported in `InferSummary.timings` (seconds, summed)."""

PROBS_SCALE = 255
"""Saved probabilities are uint8 round(p·255): 1/510 worst-case error, 4× smaller than float32."""


@dataclass
class InferSummary:
    """What an `infer` run did: the CSV, counts, unreadable images and where the time went."""

    out: str
    images: int
    fused: bool
    device: str
    seconds: float
    skipped: list[str] = field(default_factory=list)
    boxes: dict[str, list[int]] = field(default_factory=dict)  # fused runs: name -> [x0, y0, side]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_shard(spec: str | Sequence[int]) -> tuple[int, int]:
    """`"i/n"` or (i, n) → (i, n) with 0 ≤ i < n."""
    if isinstance(spec, str):
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise TwostageError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    else:
        i, n = (int(x) for x in spec)
    if n < 1 or not 0 <= i < n:
        raise TwostageError(f"--shard {i}/{n}: need 0 <= i < n")
    return i, n


def shard_samples(samples: list[Sample], shard: tuple[int, int]) -> list[Sample]:
    """The i-th of n contiguous, near-equal slices of the sorted samples, so the shard CSVs
    concatenated in shard order (headers dropped) are the full CSV in sorted order."""
    i, n = shard
    bounds = np.linspace(0, len(samples), n + 1).round().astype(int)
    return samples[bounds[i]:bounds[i + 1]]


def write_probs(path: str | os.PathLike, probs: torch.Tensor, classes: Sequence[str] = CLASSES) -> None:
    """Write (C, H, W) probabilities as a compressed uint8-quantised npz, atomically.

    Arrays: `probs` (C, H, W) uint8 = round(p·PROBS_SCALE), `classes` (C,) str. The file name
    is the image's PNG basename with `.npz`: the key ensembling matches on.
    """
    q = torch.mul(probs, PROBS_SCALE).round_().clamp_(0, PROBS_SCALE).to(torch.uint8).cpu().numpy()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probs=q, classes=np.array(list(classes)))


def _from_probs_file(path: str | os.PathLike, read):
    """`read(npz)` on an opened `write_probs` file; anything unreadable is one TwostageError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return read(z)
    except (OSError, KeyError, ValueError) as e:
        raise TwostageError(f"{path}: not a saved-probabilities file ({e})") from None


def read_probs(path: str | os.PathLike, out: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """(classes, (C, H, W) float32 probabilities) from a `write_probs` file.

    `out`: a float32 array to fill when it has the file's shape (a reader of many files
    reuses one buffer instead of faulting in a fresh 0.5 GB array per 2048² file)."""
    def read(z) -> tuple[list[str], np.ndarray]:
        q = z["probs"]
        buf = out if out is not None and out.shape == q.shape and out.dtype == np.float32 else None
        # one pass from uint8 to float32 (astype then divide would be two full-size passes)
        return [str(c) for c in z["classes"]], np.divide(q, np.float32(PROBS_SCALE), out=buf, dtype=np.float32)

    return _from_probs_file(path, read)


def probs_classes(path: str | os.PathLike) -> list[str]:
    """The classes of a `write_probs` file, without decompressing its probabilities."""
    return _from_probs_file(path, lambda z: [str(c) for c in z["classes"]])


class _Clock:
    """Sums wall time per pipeline step; synchronises CUDA so GPU work lands in its own step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals = dict.fromkeys(STAGES, 0.0)
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[stage] += now - self._t
        self._t = now


def palm_box_rule(meta: dict):
    """The BoxRule of a palm checkpoint's meta: `box_rule`, completed by the separately
    stored `fallback_box` and `side_range` (the training boxes' mean and side range)."""
    import dataclasses

    from .box import BoxRule

    rule = BoxRule.from_dict(meta["box_rule"])
    fallback = meta.get("fallback_box")
    if rule.fallback is None and fallback is not None:
        rule = dataclasses.replace(rule, fallback=tuple(fallback))
    side_range = meta.get("side_range")
    if side_range is not None and rule.side_min is None and rule.side_max is None:
        rule = dataclasses.replace(rule, side_min=float(side_range[0]), side_max=float(side_range[1]))
    return rule


def fuse_box(native: torch.Tensor, palm_probs: torch.Tensor, channels: Sequence[int], box,
             image_shape: tuple[int, int], weights: torch.Tensor, feather: float = DEFAULT_FEATHER
             ) -> torch.Tensor:
    """The fused (K, s, s) probabilities of the palm box, written into `palm_probs` IN PLACE:
    the global probabilities of the box, upsampled from the network-size `native` (C, h, w)
    for the box alone, blended with the palm ones by `fusion.blend_box`.

    Args:
        palm_probs: (K, s, s) palm probabilities at the box size (overwritten).
        channels: global channel of each palm channel.
        weights: (C,) fusion weights a_c per global channel.
    """
    side = int(box.side)
    idx = torch.as_tensor(channels, device=native.device)
    source = native.index_select(0, idx)
    a = weights.to(native.device)[idx]
    # row chunks: the temporaries stay small (a 0.6·2048 box in one piece would allocate
    # 48 MB tensors, whose page faults cost more than the arithmetic)
    for r0 in range(0, side, BOX_ROWS):
        rows = slice(r0, min(side, r0 + BOX_ROWS))
        part = upsample_region(source, image_shape, box.y0 + r0, box.x0, rows.stop - r0, side)
        palm_probs[:, rows] = fusion.blend_box(part, palm_probs[:, rows], box, image_shape, a, feather, rows)
    return palm_probs


class PalmStage:
    """The palm half of the chain, rebuilt from a palm checkpoint: box rule, recorded upscaler
    and palm model. Pure per call (no per-image state)."""

    def __init__(self, ckpt: str | os.PathLike, device: torch.device, *, fp16: bool = False,
                 tta: bool = False, palm_resize: str = "bilinear", upscaler_tile: int = 0,
                 upscaler_tile_pad: int = 10, upscaler_pre_pad: int = 0,
                 weights_dir: str | os.PathLike | None = None):
        from .sr import make_upscaler

        if palm_resize not in PALM_RESIZE_MODES:
            raise TwostageError(f"palm_resize={palm_resize!r}: use one of {', '.join(PALM_RESIZE_MODES)}")
        self.predictor = Predictor.from_checkpoint(ckpt, device, expect_stage="palm")
        meta = self.predictor.meta
        for key in ("box_rule", "palm_set"):
            if not meta.get(key):
                raise TwostageError(f"{ckpt}: palm checkpoint lacks {key!r} (train it with `twostage train --stage palm`)")
        self.classes = list(self.predictor.classes)
        try:
            self.channels = class_indices(self.classes)  # palm channel → global channel
        except TwostageError as e:
            raise TwostageError(f"{ckpt}: palm model classes do not fit the 29 CSV classes ({e})") from None
        self.rule = palm_box_rule(meta)
        record = meta["palm_set"]
        self.upscaler = make_upscaler(record["upscaler"], scale=record.get("scale"), tile=upscaler_tile,
                                      tile_pad=upscaler_tile_pad, pre_pad=upscaler_pre_pad,
                                      device=str(device), weights_dir=weights_dir)
        have = self.upscaler.record()
        for key in ("upscaler", "scale", "weight_sha256"):
            if have.get(key) != record.get(key):
                raise TwostageError(
                    f"{ckpt}: the palm model was trained on crops made by {record.get('upscaler')} "
                    f"x{record.get('scale')} (weights sha256 {record.get('weight_sha256')}); this machine's "
                    f"upscaler has {key}={have.get(key)!r}. Install the recorded weights (see "
                    f"`twostage weights`); a different upscaler is never substituted")
        self.fp16, self.tta, self.palm_resize = fp16, tta, palm_resize

    def boxes(self, probs: torch.Tensor, names: Sequence[str],
              image_shape: tuple[int, int] | None = None) -> list:
        """One palm box per image from the global model's predicted carpal pixels: all 8
        PALM_CLASSES (the training box covers them all, whatever subset the palm model predicts).

        `probs` are (B, C, h, w) global probabilities at any resolution (infer passes the
        network's own: nothing is lost and it is far cheaper than the source size);
        `image_shape` is the (H, W) of the source images the boxes are for."""
        from .box import boxes_from_probs

        lo, hi = min(PALM_INDICES), max(PALM_INDICES) + 1  # contiguous in CLASSES: a view, no copy
        return boxes_from_probs(probs[:, lo:hi], self.rule, names=list(names), image_shape=image_shape)

    def fused_box(self, native: torch.Tensor, image: np.ndarray, box, weights: torch.Tensor,
                  feather: float = DEFAULT_FEATHER, tick=lambda stage: None) -> torch.Tensor:
        """(K, s, s) fused probabilities of the palm channels inside `box` for one image
        (docs/DESIGN.md §3): the box cut from the SOURCE image → recorded upscaler → palm probabilities
        at the box size, blended into the global probabilities of the box, which are upsampled
        from the network-size `native` (C, h, w) for the box alone.

        Args:
            weights: (C,) fusion weights a_c per global channel.
            tick: called with "upscale" and "palm" after those steps (timings).
        """
        crop = self.crop_upscaled(image, box)
        tick("upscale")
        p_palm = self.probs(crop, box, native.device)
        tick("palm")
        return fuse_box(native, p_palm, self.channels, box, image.shape, weights, feather)

    def crop_upscaled(self, image: np.ndarray, box) -> np.ndarray:
        """The box cut from the SOURCE image, upscaled by the recorded upscaler: (s·k, s·k) uint8."""
        from .box import crop_image

        return self.upscaler(np.ascontiguousarray(crop_image(image, box)))

    def probs(self, crop: np.ndarray, box, device: torch.device) -> torch.Tensor:
        """(K, side, side) float32 palm probabilities for one upscaled crop, at the box size.

        The palm network sees the crop resized to its input size (the Predictor's one
        preprocessing path); its sigmoid probabilities go straight from the input size to the
        box size (resizing to the upscaled crop size first and then down would only blur).
        """
        x = torch.from_numpy(np.ascontiguousarray(crop))[None].to(device)
        p = torch.sigmoid(self.predictor.logits_at(x, tta=self.tta, fp16=self.fp16))
        side = int(box.side)
        if self.palm_resize == "area":
            return F.interpolate(p, size=(side, side), mode="area")[0]
        return F.interpolate(p, size=(side, side), mode="bilinear", align_corners=False)[0]


class Segmentation(NamedTuple):
    """One image's result from `segment`."""

    masks: torch.Tensor                 # (C, H, W) bool
    region: torch.Tensor | None         # (K, s, s) fused palm-box probabilities, or None
    rows: torch.Tensor | None           # (C, H) bool, False: row holds no foreground (or None)


def segment(native: torch.Tensor, image: np.ndarray, thr: torch.Tensor, palm: PalmStage | None = None,
            box=None, weights: torch.Tensor | None = None, feather: float = DEFAULT_FEATHER,
            tick=lambda stage: None) -> Segmentation:
    """The masks of one source image from its network-size probabilities.

    The global masks come from `upsample.threshold_upsample` (only tiles that can cross a
    threshold are upsampled); with `palm`, the box region of the palm channels is replaced by
    the thresholded `PalmStage.fused_box`. Equal to thresholding the fully upsampled and fused
    probabilities, except for pixels whose value ties with the threshold in float rounding.
    `rows` is the hint for `rle.encode_masks(masks, rows=rows)`.

    Args:
        native: (C, h, w) global probabilities at the network's size, on the device.
        image: (H, W) uint8 source image.
        thr: (C,) thresholds on the device.
        palm, box, weights, feather: the palm stage, this image's palm box, (C,) a_c.
        tick: called with a step name after each step (timings).
    """
    masks, rows = threshold_upsample(native, image.shape, thr)
    tick("masks")
    if palm is None:
        return Segmentation(masks, None, rows)
    region = palm.fused_box(native, image, box, weights, feather, tick)
    channels = torch.as_tensor(palm.channels, device=masks.device)
    ys, xs = box.slices
    masks[:, ys, xs].index_copy_(0, channels, fusion.binarize(region, thr.index_select(0, channels)))
    if rows is not None:
        rows[:, ys].index_fill_(0, channels, True)
    tick("fusion")
    return Segmentation(masks, region, rows)


def full_probs(native: torch.Tensor, size: tuple[int, int], palm: PalmStage | None = None, box=None,
               region: torch.Tensor | None = None) -> torch.Tensor:
    """(C, H, W) float32 source-size probabilities (for `--save-probs`): the dense upsample of
    `native`, with the fused palm-box `region` from `segment` written into the palm channels."""
    probs = resize_images(native[None], size)[0]
    if region is not None:
        rows, cols = box.slices
        probs[:, rows, cols].index_copy_(0, torch.as_tensor(palm.channels, device=probs.device), region)
    return probs


def _read_batches(samples: list[Sample], batch_size: int, skip_bad: bool
                  ) -> Iterator[list[tuple[Sample, np.ndarray | None]]]:
    """Batches of (sample, image) with one batch read ahead in a thread (IO overlaps compute).
    A batch never mixes image sizes; an unreadable image is None with `skip_bad`, else raises."""

    def read(s: Sample) -> tuple[Sample, np.ndarray | None]:
        try:
            return s, read_image(s.image_path)
        except TwostageError:
            if not skip_bad:
                raise
            log.warning("%s: unreadable, writing empty masks (--skip-bad)", s.image_path)
            return s, None

    def groups() -> Iterator[list[Sample]]:
        for k in range(0, len(samples), batch_size):
            yield samples[k:k + batch_size]

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for group in groups():
            future = pool.submit(lambda g=group: [read(s) for s in g])
            if pending is not None:
                yield from _split_by_shape(pending.result())
            pending = future
        if pending is not None:
            yield from _split_by_shape(pending.result())


def _split_by_shape(items: list[tuple[Sample, np.ndarray | None]]
                    ) -> Iterator[list[tuple[Sample, np.ndarray | None]]]:
    """Consecutive runs of equal image shape (bad images alone), order kept."""
    run: list = []
    for s, img in items:
        if run and (img is None or run[0][1] is None or run[0][1].shape != img.shape):
            yield run
            run = []
        run.append((s, img))
    if run:
        yield run


def infer(images: str | os.PathLike, global_ckpt: str | os.PathLike, out: str | os.PathLike, *,
          palm_ckpt: str | os.PathLike | None = None, fuse: bool = False, device: str = "cpu",
          batch_size: int = 1, fp16: bool = False, tta: str | None = None,
          thresholds: PerClassSpec = None, fuse_weights: PerClassSpec = None,
          feather: float = DEFAULT_FEATHER, palm_resize: str = "bilinear",
          save_probs: str | os.PathLike | None = None, shard: str | Sequence[int] = (0, 1),
          skip_bad: bool = False, upscaler_tile: int = 0, upscaler_tile_pad: int = 10,
          upscaler_pre_pad: int = 0, weights_dir: str | os.PathLike | None = None,
          split: str | None = None) -> InferSummary:
    """Segment every image under IMAGES and write the §2 CSV to `out` (atomically).

    Args:
        images: a folder of PNGs (searched recursively) or a dataset root (its test/DCM, or
            train/DCM if it has no test split; `split` picks one explicitly).
        global_ckpt: checkpoint (or run folder) of a global model predicting all 29 CLASSES.
        out: the CSV; written only if every image succeeds (an existing file is untouched).
        palm_ckpt, fuse: with `fuse`, blend the palm model's predictions into the
            global ones inside the palm box (docs/DESIGN.md §3); without, the global model alone.
        device: torch device the whole chain runs on ("cpu", "cuda", "cuda:1").
        batch_size: images per global forward pass (same-size images only).
        fp16: autocast the networks to float16 (CUDA only; an error elsewhere).
        tta: None or "hflip" (average with the horizontally flipped prediction), both models.
        thresholds: per-class thresholds: number, {class: t} or YAML file (default 0.5).
        fuse_weights: per-class fusion weights a_c (default 0.7 for the palm classes).
        feather: feather ramp as a fraction of the box side.
        palm_resize: "bilinear" or "area", palm probabilities to the box size.
        save_probs: folder; also write per-image uint8 probabilities (`write_probs`) for ensembling.
        shard: "i/n": process only the i-th of n contiguous slices of the sorted images.
        skip_bad: write empty masks for unreadable images (listed in the summary) instead of
            stopping the run.
        upscaler_tile, upscaler_tile_pad, upscaler_pre_pad, weights_dir: how the recorded
            upscaler runs (tiling saves memory; the result is the same).
    Returns:
        InferSummary (CSV path, counts, skipped images, step timings).
    """
    from tqdm import tqdm

    from .rle import CsvWriter, encode_masks

    t_start = time.perf_counter()
    dev = torch_device(device)
    if fp16 and dev.type != "cuda":
        raise TwostageError(f"--fp16 needs a CUDA device (got --device {device}); float16 on CPU is slow or unsupported")
    if tta not in (None, "none", "hflip"):
        raise TwostageError(f"--tta {tta!r}: use hflip or leave it out")
    use_tta = tta == "hflip"
    if fuse and palm_ckpt is None:
        raise TwostageError("--fuse needs a palm checkpoint (--palm CKPT)")
    if batch_size < 1:
        raise TwostageError(f"--batch-size {batch_size}: must be at least 1")
    out = Path(out)
    if out.is_dir():
        raise TwostageError(f"{out}: is a folder; --out takes the CSV file to write")
    shard = parse_shard(shard)

    if split is None and (Path(images) / "test" / "DCM").is_dir():
        split = "test"  # a dataset root: predict its test split unless told otherwise
    samples = shard_samples(find_samples(images, split), shard)
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise TwostageError(f"{images}: image names repeat ({', '.join(dup)}); CSV rows are keyed by file name")

    glob = Predictor.from_checkpoint(global_ckpt, dev, expect_stage="global")
    if list(glob.classes) != list(CLASSES):
        raise TwostageError(f"{global_ckpt}: the global model predicts {len(glob.classes)} classes "
                            f"({', '.join(glob.classes[:3])}, ...); the CSV needs all {len(CLASSES)} in §2 order")
    palm = None
    if fuse:
        palm = PalmStage(palm_ckpt, dev, fp16=fp16, tta=use_tta, palm_resize=palm_resize,
                         upscaler_tile=upscaler_tile, upscaler_tile_pad=upscaler_tile_pad,
                         upscaler_pre_pad=upscaler_pre_pad, weights_dir=weights_dir)
        weights = fusion.fuse_weights(fuse_weights, palm.classes).to(dev)
    else:
        weights = None
        if palm_ckpt is not None:
            log.info("--palm given without --fuse: running the global model alone")
    thr = fusion.thresholds(thresholds).to(dev)
    probs_dir = Path(save_probs) if save_probs is not None else None

    summary = InferSummary(out=str(out), images=len(samples), fused=palm is not None,
                           device=str(dev), seconds=0.0)
    clock = _Clock(dev)
    bar = tqdm(total=len(samples), desc="infer", unit="img", disable=None)
    with CsvWriter(out) as writer:
        for batch in _read_batches(samples, batch_size, skip_bad):
            clock.lap("read")
            if batch[0][1] is None:
                sample = batch[0][0]
                writer.add(sample.name, [""] * len(CLASSES))
                summary.skipped.append(str(sample.image_path))
                bar.update(1)
                continue
            batch_names = [s.name for s, _ in batch]
            size = batch[0][1].shape
            x = torch.from_numpy(np.stack([img for _, img in batch])).to(dev)
            native = glob.native_probs(x, tta=use_tta, fp16=fp16)  # (B, C, h, w) at the network's size
            del x
            clock.lap("global")
            boxes = [None] * len(batch)
            if palm is not None:
                boxes = palm.boxes(native, batch_names, size)
                summary.boxes.update({n: [int(b.x0), int(b.y0), int(b.side)] for n, b in zip(batch_names, boxes)})
                clock.lap("box_crop")
            for b, ((sample, image), box) in enumerate(zip(batch, boxes)):
                seg = segment(native[b], image, thr, palm, box, weights, feather, clock.lap)
                if probs_dir is not None:
                    write_probs(probs_dir / (Path(sample.name).stem + ".npz"),
                                full_probs(native[b], size, palm, box, seg.region))
                    clock.lap("save_probs")
                writer.add(sample.name, encode_masks(seg.masks, rows=seg.rows))
                del seg
                clock.lap("rle_write")
            del native
            bar.update(len(batch))
    bar.close()
    summary.timings = clock.totals
    summary.seconds = time.perf_counter() - t_start
    per_image = {k: round(v / max(1, len(samples)), 4) for k, v in summary.timings.items() if v}
    log.info("seconds per image by step: %s", per_image)
    if summary.skipped:
        log.warning("%d unreadable image(s) written as empty masks: %s", len(summary.skipped),
                    ", ".join(summary.skipped))
    return summary
