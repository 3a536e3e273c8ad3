"""The two-stage chain, built once from two checkpoints and the inference options, used by
every command that runs the networks: infer, evaluate, calibrate and visualize
(docs/DESIGN.md §3, §6). An option added to `ChainOptions` (and to `cli.options`) reaches
all of them.

Per image: global probabilities at the network's size (`TwoStage.native`) → palm box from
their carpal channels (`boxes`) → box cut from the SOURCE image → recorded upscaler → palm
probabilities at the box size → blended into the global probabilities of the box
(`fusion.blend_box`) → per-class thresholds (`TwoStage.segment`). Everything runs on the chain's
device, batched over the classes; with images on the device (infer uploads each batch once)
a network upscaler's crop never leaves it, and the palm crops of a batch go through the palm
network in one forward (`TwoStage.palm_regions`).

The palm checkpoint carries how its training crops were made (box rule with fallback and
side range, upscaler name, scale and weight sha256); the chain rebuilds exactly that and
refuses to run with anything else (a model trained on Real-ESRGAN crops is never silently
fed bicubic crops).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import fusion
from ..box import Box, BoxRule, boxes_from_probs, crop_image
from ..classes import CLASSES, PALM_INDICES, class_indices
from ..devices import torch_device
from ..errors import TwostageError
from ..fusion import DEFAULT_FEATHER, PerClassSpec
from ..models import Predictor, resize_images
from ..window import DEFAULT_OVERLAP, check_overlap, parse_scales
from .calibration import find_calibration
from .upsample import threshold_upsample, upsample_region

log = logging.getLogger(__name__)

BOX_ROWS = 64
"""Rows of the palm box upsampled and blended per step."""

PALM_RESIZE_MODES = ("bilinear", "area")
"""How palm probabilities at the palm model's input size are resized to the box size."""

ACCUMULATE = ("device", "cpu")
"""Where sliding-window outputs are accumulated (`ChainOptions.accumulate`)."""

TTA_MODES = ("hflip",)
"""Test-time augmentations: hflip averages with the horizontally flipped prediction."""


@dataclasses.dataclass(frozen=True)
class ChainOptions:
    """How the chain runs; every command that runs the networks takes all of these.

    device: torch device for both networks and the fusion ("cpu", "cuda", "cuda:1").
    fp16: float16 autocast of the networks (CUDA only).
    tta: None or "hflip", for both networks.
    thresholds: per-class thresholds (number, {class: t} or YAML file; default 0.5).
    fuse_weights: per-class fusion weights a_c (default 0.7 for the palm classes).
    feather: feather ramp as a fraction of the box side.
    palm_resize: "bilinear" or "area", palm probabilities to the box size.
    upscaler_tile, upscaler_tile_pad, upscaler_pre_pad, weights_dir: how the recorded upscaler
        runs (tiling saves memory; the result is the same).
    scales: multi-scale TTA: the image scales whose probabilities are averaged (default (1.0,)),
        for both networks; composable with `tta`.
    overlap: window overlap of patch-trained checkpoints' sliding-window inference.
    accumulate: where sliding-window outputs are accumulated: "device" (the compute device) or
        "cpu" (keeps a huge image's probabilities off the GPU; fusion then runs on the CPU).
    calibration: the per-class weights and thresholds `twostage calibrate` chose for this
        checkpoint pair: "auto" (from <palm run>/calibration when it is there and was made for
        these two checkpoints), "none", or a folder / calibration.json. Explicit `thresholds`
        or `fuse_weights` win over it.
    compile: `torch.compile` both networks (opt-in: compiling takes minutes before the first
        image and pays only over many images of one size).
    """

    device: str = "cpu"
    fp16: bool = False
    tta: str | None = None
    thresholds: PerClassSpec = None
    fuse_weights: PerClassSpec = None
    feather: float = DEFAULT_FEATHER
    palm_resize: str = "bilinear"
    upscaler_tile: int = 0
    upscaler_tile_pad: int = 10
    upscaler_pre_pad: int = 0
    weights_dir: str | os.PathLike | None = None
    calibration: str | os.PathLike | None = "auto"
    scales: Sequence[float] | str = (1.0,)
    overlap: float = DEFAULT_OVERLAP
    accumulate: str = "device"
    compile: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", parse_scales(self.scales))
        object.__setattr__(self, "overlap", check_overlap(self.overlap))
        if self.accumulate not in ACCUMULATE:
            raise TwostageError(f"--accumulate {self.accumulate!r}: use one of {', '.join(ACCUMULATE)}")
        if self.tta not in (None, "none", *TTA_MODES):
            raise TwostageError(f"--tta {self.tta!r}: use {', '.join(TTA_MODES)} or leave it out")
        if self.palm_resize not in PALM_RESIZE_MODES:
            raise TwostageError(f"--palm-resize {self.palm_resize!r}: use one of {', '.join(PALM_RESIZE_MODES)}")
        fusion.check_feather(self.feather)
        if self.upscaler_tile < 0 or self.upscaler_tile_pad < 0 or self.upscaler_pre_pad < 0:
            raise TwostageError("--tile, the tile padding and the pre-padding must be >= 0 pixels")

    @property
    def hflip(self) -> bool:
        return self.tta == "hflip"


def refuse_chain_options(options: dict, fuse: bool = False) -> None:
    """Predictions read from a CSV: `fuse` and every ChainOptions field but the device apply to
    checkpoints only, so one given with a CSV is an error rather than silently ignored."""
    default = ChainOptions()
    if fuse or any(v != getattr(default, k) for k, v in options.items() if k != "device"):
        raise TwostageError("--fuse and the inference options (--thresholds, --tta, ...) apply to "
                            "checkpoints, not --csv")


def palm_box_rule(meta: dict) -> BoxRule:
    """The BoxRule of a palm checkpoint's meta (the palm set's rule, with the fallback box and
    side range of its training boxes)."""
    return BoxRule.from_dict(meta["box_rule"])


def fuse_box(native: torch.Tensor, palm_probs: torch.Tensor, channels: Sequence[int], box: Box,
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
    """The palm half of the chain: box rule, upscaler and palm model (`PalmStage.load` rebuilds
    them from a palm checkpoint; `onnx_backend` from an exported folder). Pure per call (no
    per-image state)."""

    def __init__(self, predictor: Predictor, rule: BoxRule, upscaler, options: ChainOptions = ChainOptions(),
                 source: str | os.PathLike = "palm model"):
        self.predictor, self.rule, self.upscaler = predictor, rule, upscaler
        self.classes = list(predictor.classes)
        try:
            self.channels = class_indices(self.classes)  # palm channel → global channel
        except TwostageError as e:
            raise TwostageError(f"{source}: palm model classes do not fit the 29 CSV classes ({e})") from None
        self.fp16, self.tta, self.palm_resize = options.fp16, options.hflip, options.palm_resize
        self.scales, self.overlap = options.scales, options.overlap

    @classmethod
    def load(cls, ckpt: str | os.PathLike, device: torch.device, options: ChainOptions = ChainOptions()) -> "PalmStage":
        """The palm stage of a palm checkpoint, with exactly the upscaler its crops were made by."""
        from ..sr.upscale import make_upscaler

        predictor = Predictor.from_checkpoint(ckpt, device, expect_stage="palm")
        meta = predictor.meta
        for key in ("box_rule", "palm_set"):
            if not meta.get(key):
                raise TwostageError(f"{ckpt}: palm checkpoint lacks {key!r} (train it with `twostage train --stage palm`)")
        record = meta["palm_set"]
        upscaler = make_upscaler(record["upscaler"], scale=record.get("scale"), tile=options.upscaler_tile,
                                 tile_pad=options.upscaler_tile_pad, pre_pad=options.upscaler_pre_pad,
                                 device=str(device), weights_dir=options.weights_dir)
        have = upscaler.record()
        for key in ("upscaler", "scale", "weight_sha256"):
            if have.get(key) != record.get(key):
                raise TwostageError(
                    f"{ckpt}: the palm model was trained on crops made by {record.get('upscaler')} "
                    f"x{record.get('scale')} (weights sha256 {record.get('weight_sha256')}); this machine's "
                    f"upscaler has {key}={have.get(key)!r}. Install the recorded weights (see "
                    f"`twostage weights`); a different upscaler is never substituted")
        return cls(predictor, palm_box_rule(meta), upscaler, options, ckpt)

    def boxes(self, probs: torch.Tensor, names: Sequence[str],
              image_shape: tuple[int, int] | None = None) -> list[Box]:
        """One palm box per image from the global model's predicted carpal pixels: all 8
        PALM_CLASSES (the training box covers them all, whatever subset the palm model predicts).

        `probs` are (B, C, h, w) global probabilities at any resolution (the network's own:
        nothing is lost and it is far cheaper than the source size); `image_shape` is the
        (H, W) of the source images the boxes are for."""
        lo, hi = min(PALM_INDICES), max(PALM_INDICES) + 1  # contiguous in CLASSES: a view, no copy
        return boxes_from_probs(probs[:, lo:hi], self.rule, names=list(names), image_shape=image_shape)

    def crop_upscaled(self, image: np.ndarray | torch.Tensor, box: Box) -> torch.Tensor:
        """The box cut from the SOURCE image (numpy, or a tensor on the chain's device),
        upscaled by the recorded upscaler: (s·k, s·k) uint8 on the device (a network upscaler
        keeps a device crop there; bicubic runs on the host)."""
        crop = crop_image(image, box)
        if isinstance(crop, np.ndarray):
            crop = torch.from_numpy(np.ascontiguousarray(crop))
        return self.upscaler.tensor(crop)

    def probs(self, crop: torch.Tensor, box: Box, device: torch.device) -> torch.Tensor:
        """(K, side, side) float32 palm probabilities for one upscaled crop, at the box size."""
        return self.regions([crop], [box], device)[0]

    def regions(self, crops: Sequence[torch.Tensor], boxes: Sequence[Box], device: torch.device) -> list[torch.Tensor]:
        """(K, side, side) float32 palm probabilities of each upscaled crop, at its box's size.

        The palm network sees each crop resized to its input size (the Predictor's one
        preprocessing path), all crops in one forward; its sigmoid probabilities go straight
        from the input size to the box size (resizing to the upscaled crop size first and
        then down would only blur). A patch-trained palm model runs crop by crop.
        """
        kw = dict(tta=self.tta, fp16=self.fp16, scales=self.scales, overlap=self.overlap)
        if self.predictor.window is None:
            probs = list(self.predictor.native_probs(list(crops), **kw))
        else:
            probs = [self.predictor.native_probs(c[None], **kw)[0] for c in crops]
        out = []
        for p, box in zip(probs, boxes):
            side = (int(box.side),) * 2
            p = F.interpolate(p[None], size=side, mode="area") if self.palm_resize == "area" else \
                F.interpolate(p[None], size=side, mode="bilinear", align_corners=False)
            out.append(p[0].to(device))
        return out


class Segmentation(NamedTuple):
    """One image's result from `TwoStage.segment`."""

    masks: torch.Tensor                 # (C, H, W) bool
    box: Box | None                     # the palm box (fused runs, or a chain with a palm stage)
    region: torch.Tensor | None         # (K, s, s) fused palm-box probabilities, or None
    rows: torch.Tensor | None           # (C, H) bool, False: row holds no foreground (or None)


class TwoStage:
    """The global model, optionally the palm stage, and the options both run with.

    With a palm checkpoint every image gets a palm box; `fuse=False` in `segment` gives the
    global model's masks alone (evaluate compares both from one chain).
    """

    def __init__(self, glob: Predictor, palm: PalmStage | None, options: ChainOptions, device: torch.device,
                 calibrated_by: str | None = None):
        self.glob, self.palm, self.options, self.device = glob, palm, options, device
        self.calibrated_by = calibrated_by  # the calibration.json whose values `options` carry, if any
        self.thr = fusion.thresholds(options.thresholds).to(device)
        self.weights = None if palm is None else fusion.fuse_weights(options.fuse_weights, palm.classes).to(device)

    @classmethod
    def load(cls, global_ckpt: str | os.PathLike, palm_ckpt: str | os.PathLike | None = None,
             options: ChainOptions = ChainOptions()) -> "TwoStage":
        """The chain of a global checkpoint and, optionally, a palm checkpoint (or run folders)."""
        device = torch_device(options.device)
        if options.fp16 and device.type != "cuda":
            raise TwostageError(f"--fp16 needs a CUDA device (got --device {options.device}); "
                                "float16 on CPU is slow or unsupported")
        glob = Predictor.from_checkpoint(global_ckpt, device, expect_stage="global")
        if list(glob.classes) != list(CLASSES):
            raise TwostageError(f"{global_ckpt}: the global model predicts {len(glob.classes)} classes "
                                f"({', '.join(glob.classes[:3])}, ...); the chain needs all {len(CLASSES)} "
                                "in the CSV's order")
        glob.tune(compile=options.compile)
        if palm_ckpt is None:
            return cls(glob, None, options, device)
        palm = PalmStage.load(palm_ckpt, device, options)
        palm.predictor.tune(compile=options.compile)
        options, used = _with_calibration(options, global_ckpt, palm_ckpt)
        return cls(glob, palm, options, device, used)

    @classmethod
    def build(cls, global_ckpt: str | os.PathLike, palm_ckpt: str | os.PathLike | None = None,
              **options) -> "TwoStage":
        """`TwoStage.load(global_ckpt, palm_ckpt, ChainOptions(**options))`."""
        return cls.load(global_ckpt, palm_ckpt, ChainOptions(**options))

    def with_options(self, **changes) -> "TwoStage":
        """The same networks with other per-class options (thresholds, fuse_weights): no reload."""
        return TwoStage(self.glob, self.palm, dataclasses.replace(self.options, **changes), self.device)

    def native(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W) uint8 (numpy, or a tensor on any device) → (B, C, h, w) global
        probabilities at the network's working size (`Predictor.working_shape`), on the device
        (on the CPU with `accumulate="cpu"`)."""
        x = torch.as_tensor(images).to(self.device)
        o = self.options
        return self.glob.native_probs(x, tta=o.hflip, fp16=o.fp16, scales=o.scales, overlap=o.overlap,
                                      out_device="cpu" if o.accumulate == "cpu" else None)

    def boxes(self, native: torch.Tensor, names: Sequence[str], image_shape: tuple[int, int]) -> list[Box | None]:
        """The palm box of each image (None for all without a palm stage)."""
        if self.palm is None:
            return [None] * native.shape[0]
        return self.palm.boxes(native, names, image_shape)

    def palm_regions(self, images: np.ndarray | torch.Tensor, boxes: Sequence[Box],
                     tick=lambda stage: None) -> list[torch.Tensor]:
        """(K, s, s) palm probabilities in each image's box: every crop upscaled (on the device,
        for a network upscaler and device images), then one palm forward for all of them."""
        crops = [self.palm.crop_upscaled(image, box) for image, box in zip(images, boxes)]
        tick("upscale")
        regions = self.palm.regions(crops, boxes, self.device)
        tick("palm")
        return regions

    def segment(self, native: torch.Tensor, image: np.ndarray | torch.Tensor, box: Box | None = None,
                fuse: bool = True, tick=lambda stage: None, region: torch.Tensor | None = None) -> Segmentation:
        """The masks of one source image from its network-size (C, h, w) probabilities.

        The global masks come from `upsample.threshold_upsample` (only tiles that can cross a
        threshold are upsampled); with a palm stage, `fuse` and a `box`, the box region of the
        palm channels is replaced by the thresholded fused probabilities (docs/DESIGN.md §3).
        Equal to thresholding the fully upsampled and fused probabilities, except for pixels
        whose value ties with the threshold in float rounding. `rows` is the hint for
        `rle.encode_masks(masks, rows=rows)`; `tick` is called with a step name after each step.
        `region`: the box's palm probabilities from `palm_regions`, if already computed.
        """
        masks, rows = threshold_upsample(native, tuple(image.shape), self.thr)
        tick("masks")
        if self.palm is None or not fuse or box is None:
            return Segmentation(masks, box, None, rows)
        palm = self.palm
        if region is None:
            region = self.palm_regions(image[None], [box], tick)[0]
        region = region.to(native.device)  # accumulate="cpu": the fusion runs where the probabilities are
        fuse_box(native, region, palm.channels, box, tuple(image.shape), self.weights, self.options.feather)
        channels = torch.as_tensor(palm.channels, device=masks.device)
        ys, xs = box.slices
        masks[:, ys, xs].index_copy_(0, channels, fusion.binarize(region, self.thr.index_select(0, channels.to(self.thr.device))))
        if rows is not None:
            rows[:, ys].index_fill_(0, channels, True)
        tick("fusion")
        return Segmentation(masks, box, region, rows)

    def predict(self, image: np.ndarray, name: str, fuse: bool = True) -> Segmentation:
        """One image end to end: `native` → `boxes` → `segment`."""
        native = self.native(image[None])
        return self.segment(native[0], image, self.boxes(native, [name], image.shape)[0], fuse)

    def full_probs(self, native: torch.Tensor, size: tuple[int, int], seg: Segmentation) -> torch.Tensor:
        """(C, H, W) float32 source-size probabilities (for `--save-probs`): the dense upsample
        of `native`, with the fused palm-box region of `seg` written into the palm channels."""
        probs = resize_images(native[None], size)[0]
        if seg.region is not None:
            rows, cols = seg.box.slices
            probs[:, rows, cols].index_copy_(0, torch.as_tensor(self.palm.channels, device=probs.device), seg.region)
        return probs


def _with_calibration(options: ChainOptions, global_ckpt, palm_ckpt) -> tuple[ChainOptions, str | None]:
    """`options` with the thresholds / fusion weights of the pair's calibration where they are
    not given explicitly, and the calibration file used (None: defaults)."""
    if options.thresholds is not None and options.fuse_weights is not None:
        return options, None
    found = find_calibration(global_ckpt, palm_ckpt, options.calibration)
    if found is None:
        return options, None
    for key in ("tta", "feather", "palm_resize", "scales"):
        have = list(options.scales) if key == "scales" else getattr(options, key)
        if found.get(key, [1.0] if key == "scales" else None) != have:
            log.warning("%s: calibrated with %s=%r, this run uses %r", found["path"], key, found.get(key),
                        have)
    log.info("fusion weights and thresholds calibrated by %s", found["path"])
    return dataclasses.replace(
        options, thresholds=found["thresholds"] if options.thresholds is None else options.thresholds,
        fuse_weights=found["fuse_weights"] if options.fuse_weights is None else options.fuse_weights), found["path"]
