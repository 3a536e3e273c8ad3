"""Per-class fusion weights and thresholds chosen on validation data (docs/DESIGN.md §3, "Calibration").

For every class c the mean Dice of the fused chain depends only on its own weight a_c and
threshold t_c (channels are independent; the palm box comes from the global probabilities
at a fixed 0.5 and does not move with them), so each class picks its best (a_c, t_c) pair
from the grid on its own, and the defaults (a = DEFAULT_PALM_WEIGHT, t = DEFAULT_THRESHOLD)
are always in the grid: the result is never worse than the defaults on the calibration set.

Per image the global and palm probabilities are computed once by the chain infer runs
(`chain.TwoStage`: `native`, `boxes`, the palm stage's `crop_upscaled` and `probs`); the
blend for every grid weight is `twostage.fusion.fuse` itself. `infer` upsamples only the tiles that can cross a
threshold, which equals this dense upsample except at float-rounding ties. For all
thresholds at once, pixels are bucketed by threshold on the device and per-class
intersection / prediction counts accumulated, then folded into per-image Dice sums: memory
stays flat in the number of images.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml
from tqdm import tqdm

from .. import fusion
from ..box import box_error, box_from_annotations
from ..classes import CLASSES, PALM_CLASSES
from ..data.fixes import load_annotations, select_samples
from ..data.masks import load_masks
from ..errors import TwostageError
from ..fusion import DEFAULT_PALM_WEIGHT, DEFAULT_THRESHOLD
from ..inference.calibration import CALIBRATION_FILE, default_dir, pair_fields
from ..inference.chain import TwoStage
from ..io.files import write_json_atomic, write_text_atomic
from ..io.images import read_image
from ..metrics import DICE_EPS
from ..models import resize_images

log = logging.getLogger(__name__)

WEIGHT_GRID: tuple[float, ...] = tuple(round(0.1 * k, 2) for k in range(11))
"""Default grid of fusion weights a_c: 0, 0.1, …, 1."""

THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))
"""Default grid of thresholds: 0.05, 0.1, …, 0.95."""

_CHUNK = 1 << 24
"""Elements bucketed at once (bounds the int64 temporaries at 128 MiB)."""

def parse_grid(spec: str | Sequence[float], name: str) -> tuple[float, ...]:
    """A grid from "0,0.1,0.2" or "0:1:0.1" (start:stop:step, stop included) or a sequence;
    every value must lie in [0, 1]."""
    values: list[float]
    if isinstance(spec, str):
        try:
            if ":" in spec:
                start, stop, step = (float(v) for v in spec.split(":"))
                if step <= 0:
                    raise ValueError
                values = list(np.round(np.arange(start, stop + step / 2, step), 6))
            else:
                values = [float(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise TwostageError(f"--{name} {spec!r}: expected comma-separated numbers or start:stop:step") from None
    else:
        values = [float(v) for v in spec]
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise TwostageError(f"--{name} {spec!r}: needs values in [0, 1]")
    return tuple(values)


def _grid_with(values: Sequence[float], default: float) -> tuple[float, ...]:
    return tuple(sorted(set(float(v) for v in values) | {float(default)}))


def threshold_counts(probs: torch.Tensor, gt: torch.Tensor, thresholds: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and prediction pixel counts of `probs > t` for every threshold t at once.

    Args:
        probs: (K, N) float probabilities; gt: (K, N) bool; thresholds: (T,) ascending, same
            dtype and device as `probs` (the comparison is the one `fusion.binarize` makes).
    Returns:
        (inter, pred): (K, T) int64 counts of gt & (p > t) and of p > t.
    """
    k, n = probs.shape
    t = thresholds.numel()
    hist_all = torch.zeros(k * (t + 1), dtype=torch.int64, device=probs.device)
    hist_gt = torch.zeros_like(hist_all)
    rows = max(1, _CHUNK // max(n, 1))
    for r0 in range(0, k, rows):
        p, g = probs[r0:r0 + rows], gt[r0:r0 + rows]
        # bucket i = number of thresholds strictly below p: p > t_j exactly for j < i
        keys = torch.bucketize(p, thresholds) + (torch.arange(r0, r0 + p.shape[0], device=p.device) * (t + 1))[:, None]
        hist_all += torch.bincount(keys.reshape(-1), minlength=k * (t + 1))
        hist_gt += torch.bincount(keys[g], minlength=k * (t + 1))
        del keys

    def above(h: torch.Tensor) -> torch.Tensor:  # (K, T+1) bucket counts -> (K, T) counts of p > t_j
        return h.view(k, t + 1).flip(1).cumsum(1).flip(1)[:, 1:]

    return above(hist_gt), above(hist_all)


def _dice(inter: torch.Tensor, pred: torch.Tensor, gt_sum: torch.Tensor) -> torch.Tensor:
    """Dice (docs/DESIGN.md §2) from counts; gt_sum broadcasts against the trailing threshold axis."""
    return (2.0 * inter.double() + DICE_EPS) / (pred.double() + gt_sum.double() + DICE_EPS)


@dataclass
class Calibration:
    """Chosen per-class weights and thresholds with mean Dice before/after on the calibration set."""

    classes: list[str]
    palm_classes: list[str]
    fuse_weights: dict[str, float]
    thresholds: dict[str, float]
    default_dice: dict[str, float]
    calibrated_dice: dict[str, float]
    n_images: int
    weight_grid: list[float]
    threshold_grid: list[float]
    box_error: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def means(self, which: dict[str, float]) -> tuple[float, float]:
        """(carpal mean, overall mean) of a per-class Dice mapping."""
        return (float(np.mean([which[c] for c in PALM_CLASSES])), float(np.mean(list(which.values()))))

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        (d["default_carpal_mean"], d["default_overall"]) = self.means(self.default_dice)
        (d["calibrated_carpal_mean"], d["calibrated_overall"]) = self.means(self.calibrated_dice)
        return d

    def table(self) -> str:
        """Per-class default vs calibrated Dice with the chosen a_c and t_c, then the means."""
        lines = [f"{'class':<12} {'a_c':>5} {'t_c':>5} {'default':>8} {'calibrated':>10} {'gain':>8}"]
        lines.append("-" * len(lines[0]))
        for c in self.classes:
            a = f"{self.fuse_weights[c]:.2f}" if c in self.fuse_weights else "-"
            d0, d1 = self.default_dice[c], self.calibrated_dice[c]
            lines.append(f"{c:<12} {a:>5} {self.thresholds[c]:>5.2f} {d0:>8.4f} {d1:>10.4f} {d1 - d0:>+8.4f}")
        lines.append("-" * len(lines[0]))
        for label, k in (("carpal mean", 0), ("overall", 1)):
            d0, d1 = self.means(self.default_dice)[k], self.means(self.calibrated_dice)[k]
            lines.append(f"{label:<24} {d0:>8.4f} {d1:>10.4f} {d1 - d0:>+8.4f}")
        lines.append(f"images: {self.n_images}; defaults: a={DEFAULT_PALM_WEIGHT} (palm classes), "
                     f"threshold {DEFAULT_THRESHOLD}")
        if self.box_error:
            lines.append(box_error_line(self.box_error))
        return "\n".join(lines)


def summarize_box_errors(errors: Sequence[tuple[float, float]], palm_meta: dict) -> dict:
    """Mean and max centre shift / side change of the predicted palm boxes, beside the palm
    model's training jitter (which should cover the max: larger jitter only spends training
    on boxes inference never sees, smaller leaves real errors untrained)."""
    if not errors:
        return {}
    e = np.asarray(errors, dtype=np.float64)
    box_cfg = (palm_meta.get("config") or {}).get("box") or {}
    return {"n": len(e), "shift_mean": float(e[:, 0].mean()), "shift_max": float(e[:, 0].max()),
            "side_mean": float(e[:, 1].mean()), "side_max": float(e[:, 1].max()),
            "jitter_shift": box_cfg.get("jitter_shift"), "jitter_scale": box_cfg.get("jitter_scale")}


def box_error_line(d: dict) -> str:
    """One line: the global model's palm box errors and the palm training jitter."""
    line = (f"palm box of the global model vs the annotations ({d['n']} image(s)): centre shift mean "
            f"{d['shift_mean']:.3f} / max {d['shift_max']:.3f} of the side, side change mean "
            f"{d['side_mean']:.3f} / max {d['side_max']:.3f}")
    if d.get("jitter_shift") is not None:
        line += f"; palm training jitter: shift {d['jitter_shift']:g}, scale {d['jitter_scale']:g}"
    return line


def _pick(scores: torch.Tensor, default_index: int, min_gain: float = 0.0) -> int:
    """Index of the best score of a flat grid; the default stays unless the best beats it by
    more than `min_gain` (no change without gain: on a few validation images, a smaller gain
    is as likely noise as signal)."""
    best = int(torch.argmax(scores))
    return default_index if scores[default_index] + min_gain >= scores[best] else best


class _Sums:
    """Per-image Dice summed over the calibration images, for every grid point at once."""

    def __init__(self, chain, a_grid: Sequence[float], t_grid: Sequence[float], min_gain: float = 0.0):
        dev, palm = chain.device, chain.palm
        self.chain, self.a_grid, self.t_grid, self.min_gain = chain, tuple(a_grid), tuple(t_grid), min_gain
        self.channels = torch.as_tensor(palm.channels, device=dev)
        self.thr = torch.tensor(self.t_grid, dtype=torch.float32, device=dev)
        C, K, A, T = len(CLASSES), len(palm.channels), len(self.a_grid), len(self.t_grid)
        self.dice_global = torch.zeros((C, T), dtype=torch.float64, device=dev)
        self.dice_fused = torch.zeros((K, A, T), dtype=torch.float64, device=dev)
        self.weight_rows = torch.zeros((A, C), dtype=torch.float32)
        self.weight_rows[:, palm.channels] = torch.tensor(self.a_grid, dtype=torch.float32)[:, None]
        self.n = 0
        self.box_errors: list[tuple[float, float]] = []

    def add(self, image: np.ndarray, gt: torch.Tensor, name: str, true_box=None) -> None:
        """One image: (H, W) uint8, its (C, H, W) bool ground truth on the chain's device and
        its true palm box (from the annotations, by the palm set's rule; None: not measured)."""
        chain, palm, channels, thr = self.chain, self.chain.palm, self.channels, self.thr
        C, K, A, T = self.dice_global.shape[0], len(channels), len(self.a_grid), len(self.t_grid)
        native = chain.native(image[None])
        probs = resize_images(native, image.shape)[0]  # (C, H, W)
        box = chain.boxes(native, [name], image.shape)[0]
        if true_box is not None:
            self.box_errors.append(box_error(box, true_box))
        palm_probs = palm.probs(palm.crop_upscaled(image, box), box, chain.device)  # (K, s, s)

        inter, pred = threshold_counts(probs.reshape(C, -1), gt.reshape(C, -1), thr)
        gt_sum = gt.reshape(C, -1).sum(1)
        self.dice_global += _dice(inter, pred, gt_sum[:, None])

        rows, cols = box.slices
        g_region = probs[:, rows, cols][channels]                                 # (K, s, s) copy
        gt_region = gt[:, rows, cols][channels].reshape(K, -1)
        work, fused = probs, []  # blended in place per weight, its box region restored from g_region
        for a in range(A):
            work[channels, rows, cols] = g_region
            fusion.fuse(work, palm_probs, box, self.weight_rows[a].to(chain.device),
                        feather=chain.options.feather, palm_channels=palm.channels)
            fused.append(work[:, rows, cols][channels].reshape(K, -1))
        inter_in, pred_in = threshold_counts(torch.cat(fused), gt_region.repeat(A, 1), thr)
        inter_g, pred_g = threshold_counts(g_region.reshape(K, -1), gt_region, thr)
        inter_out = (inter[channels] - inter_g)[:, None]                            # (K, 1, T)
        pred_out = (pred[channels] - pred_g)[:, None]
        self.dice_fused += _dice(inter_in.view(A, K, T).transpose(0, 1) + inter_out,
                                 pred_in.view(A, K, T).transpose(0, 1) + pred_out, gt_sum[channels][:, None, None])
        self.n += 1

    def choose(self) -> tuple[dict, dict, dict, dict]:
        """(weights, thresholds, default Dice, calibrated Dice) per class: each class its best pair."""
        dice_global, dice_fused = (self.dice_global / self.n).cpu(), (self.dice_fused / self.n).cpu()
        a0, t0 = self.a_grid.index(DEFAULT_PALM_WEIGHT), self.t_grid.index(DEFAULT_THRESHOLD)
        T = len(self.t_grid)
        weights, thresholds, before, after = {}, {}, {}, {}
        palm_row = {int(ch): k for k, ch in enumerate(self.chain.palm.channels)}
        for c_idx, c in enumerate(CLASSES):
            if c_idx in palm_row:
                scores = dice_fused[palm_row[c_idx]].reshape(-1)
                best = _pick(scores, a0 * T + t0, self.min_gain)
                weights[c], thresholds[c] = self.a_grid[best // T], self.t_grid[best % T]
                before[c], after[c] = float(scores[a0 * T + t0]), float(scores[best])
            else:
                scores = dice_global[c_idx]
                best = _pick(scores, t0, self.min_gain)
                thresholds[c] = self.t_grid[best]
                before[c], after[c] = float(scores[t0]), float(scores[best])
        return weights, thresholds, before, after


def calibrate(data: str | os.PathLike, global_ckpt: str | os.PathLike, palm_ckpt: str | os.PathLike,
              out: str | os.PathLike | None = None, *, weight_grid: Sequence[float] = WEIGHT_GRID,
              threshold_grid: Sequence[float] = THRESHOLD_GRID, split: str | None = None, fixes=None,
              images: Sequence[str] | None = None, holdout: bool = True, min_gain: float = 0.0,
              **options) -> Calibration:
    """Choose per-class fusion weights a_c and thresholds t_c maximising mean Dice on DATA.

    Writes OUT/calibration.json (the chosen values, the sha256 of both checkpoints, grids,
    per-class Dice before and after), which `infer --fuse` (and evaluate, visualize) use by
    default when OUT is the default, <palm run>/calibration; and OUT/fuse_weights.yaml and
    OUT/thresholds.yaml for `--fuse-weights / --thresholds`. `options` are the ChainOptions
    fields (device, tta, feather, palm_resize, ...): give the same as the `infer` run the
    files are for; thresholds and fuse_weights are what calibration chooses, so they are refused.

    Args:
        data: annotated images (dataset root, split folder or image folder with outputs_json
            beside it); `images` restricts to these names or stems.
        global_ckpt, palm_ckpt: the two stages, as for `infer --fuse`.
        holdout: use only the images whose ID neither checkpoint trained on (their
            `train_ids`): on the training dataset, its validation fold.
        weight_grid, threshold_grid: candidate values; the defaults are always added.
        min_gain: a class keeps the default pair unless another beats it by more than this
            mean Dice on the calibration images.
    """
    t_start = time.perf_counter()
    if not 0.0 <= min_gain < 1.0:
        raise TwostageError(f"--min-gain {min_gain}: must be in [0, 1)")
    for chosen in ("thresholds", "fuse_weights"):
        if options.get(chosen) is not None:
            raise TwostageError(f"calibrate chooses the {chosen.replace('_', ' ')}; leave --{chosen.replace('_', '-')} out")
    a_grid = _grid_with(weight_grid, DEFAULT_PALM_WEIGHT)
    t_grid = _grid_with(threshold_grid, DEFAULT_THRESHOLD)
    samples, fixes = select_samples(data, split, fixes, images)
    chain = TwoStage.build(global_ckpt, palm_ckpt, **{**options, "calibration": "none"})
    if holdout:
        samples = _held_out(samples, data, [(global_ckpt, chain.glob.meta), (palm_ckpt, chain.palm.predictor.meta)])
    unannotated = [s.rel for s in samples if s.json_path is None]
    if unannotated:
        raise TwostageError(f"{data}: {len(unannotated)} image(s) without annotation JSON "
                            f"({', '.join(unannotated[:3])}); calibration needs ground truth")
    sums = _Sums(chain, a_grid, t_grid, min_gain)
    for sample in tqdm(samples, desc="calibrate", unit="img", disable=None):
        image = read_image(sample.image_path)
        gt = torch.from_numpy(load_masks(sample, CLASSES, fixes)).to(chain.device) != 0  # (C, H, W)
        if tuple(gt.shape[1:]) != image.shape:
            raise TwostageError(f"{sample.image_path}: image is {image.shape}, its masks {tuple(gt.shape[1:])}")
        sums.add(image, gt, sample.name, box_from_annotations(load_annotations(sample, fixes), image.shape,
                                                              chain.palm.rule))
        del gt
    weights, thresholds, before, after = sums.choose()
    result = Calibration(classes=list(CLASSES), palm_classes=list(chain.palm.classes), fuse_weights=weights,
                         thresholds=thresholds, default_dice=before, calibrated_dice=after, n_images=sums.n,
                         weight_grid=list(a_grid), threshold_grid=list(t_grid),
                         box_error=summarize_box_errors(sums.box_errors, chain.palm.predictor.meta))
    _warn_jitter(result.box_error, palm_ckpt)
    result.seconds = time.perf_counter() - t_start
    _write(result, Path(out) if out is not None else default_dir(palm_ckpt), data, global_ckpt, palm_ckpt,
           chain.options, [s.name for s in samples])
    return result


def _warn_jitter(d: dict, palm_ckpt) -> None:
    """A warning when the global model's box errors exceed what the palm model trained on."""
    if d and d.get("jitter_shift") is not None and (d["shift_max"] > d["jitter_shift"]
                                                     or d["side_max"] > d["jitter_scale"]):
        log.warning("%s: the global model's palm boxes are off by up to %.3f (centre) / %.3f (side) of the side, "
                    "more than the palm training jitter (box.jitter_shift %g, box.jitter_scale %g); retrain the "
                    "palm stage with a larger jitter", palm_ckpt, d["shift_max"], d["side_max"],
                    d["jitter_shift"], d["jitter_scale"])


def _held_out(samples: list, data, metas: Sequence[tuple]) -> list:
    """The samples whose ID neither checkpoint trained on (`train_ids` of each (checkpoint, meta),
    the metas of the chain's loaded checkpoints: no second load)."""
    trained: set[str] = set()
    for ckpt, meta in metas:
        ids = meta.get("train_ids")
        if ids is None:
            log.warning("%s: records no training IDs (trained by an older twostage); calibrating on every "
                        "image given, which must be images it did not train on", ckpt)
            continue
        trained |= set(ids)
    kept = [s for s in samples if s.id not in trained]
    if not kept:
        raise TwostageError(f"{data}: every image's ID was trained on by the global or palm model; calibrate "
                            "on their validation fold (train with data.fold >= 0) or other annotated data, "
                            "or pass --all-images to calibrate on these anyway")
    log.info("calibrate: %d of %d image(s) held out from both models' training", len(kept), len(samples))
    return kept


def _write(result: Calibration, out: Path, data, global_ckpt, palm_ckpt, options, names: list[str]) -> None:
    """OUT/fuse_weights.yaml, OUT/thresholds.yaml (for infer) and OUT/calibration.json (the record
    the chain finds, with the sha256 of the checkpoints it is valid for)."""
    head = (f"# written by `twostage calibrate` on {result.n_images} image(s) of {data}\n"
            f"# global: {global_ckpt}\n# palm: {palm_ckpt}\n")
    files = [out / "fuse_weights.yaml", out / "thresholds.yaml", out / CALIBRATION_FILE]
    write_text_atomic(files[0], head + yaml.safe_dump({"fuse_weights": result.fuse_weights}, sort_keys=False))
    write_text_atomic(files[1], head + yaml.safe_dump({"thresholds": result.thresholds}, sort_keys=False))
    result.files = [str(f) for f in files]
    write_json_atomic(files[2], {**result.to_dict(), "data": str(data), "images": names,
                                 **pair_fields(global_ckpt, palm_ckpt),
                                 "tta": options.tta, "feather": options.feather, "palm_resize": options.palm_resize,
                                 "scales": list(options.scales)})
