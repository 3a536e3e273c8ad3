"""`infer --fuse` on a device against the same run on the CPU, judged on what can be compared.

Thresholded masks of barely trained models say nothing: their probabilities sit near the
threshold, where any rounding flips a pixel. So the models here are built to be confident
(the real stage architectures, random weights, then `confident_models`: batch-norm gains
capped so fp16 cannot overflow, each head channel scaled so FOREGROUND of the pixels are
foreground and the logits' std is SPREAD), and two runs are compared on
  * the largest |p_dev − p_ref| of the saved probabilities (target MAX_ABS), and
  * per class, the share of pixels whose mask (CSV) flips where either run is confident,
    |p − t| ≥ MARGIN (target FLIP_PPM per million); flips nearer the threshold are reported
    but expected from fp16 / TF32;
  * the palm boxes (target: equal within BOX_PX), and whether the reference is informative
    (every class ≥ MIN_FOREGROUND foreground, ≥ MIN_CONFIDENT of pixels confident).
Measured on a CPU, whole chain, real architectures at input 256 on a 512² phantom, against
fp32: fp16 autocast max |Δp| 0.024, 0 ppm (passes); bf16, 8x coarser, 0.22, 1472 ppm (fails);
one-pixel shift 0.74, 36453 ppm; no fusion 0.70, 4200 ppm (both fail).

`--bug` (gpu_check --inject-bug) makes the device runs wrong on purpose, to show the check fails:
shift (inputs moved one pixel), swap (two head channels exchanged), nofuse (no palm fusion).

    python benchmarks/device_compare.py models --images DIR --out DIR [--device cuda] [--bug B]
    python benchmarks/device_compare.py leg --images DIR --global G --palm P --device D [--fp16] --out LEG
        [--cpu-autocast float16]          # what a half-precision device does, emulated on a CPU
    python benchmarks/device_compare.py compare REF_LEG DEV_LEG --json ROW.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MARGIN = 0.1          # |p - t| below this: a flip is expected rounding, not an error
MAX_ABS = 0.1         # largest |p_dev - p_ref| allowed (fp16 emulated on CPU: 0.02; bugs: >= 0.7)
FLIP_PPM = 100.0      # confident flips per million pixels, worst class (fp16 on CPU: 0; bugs: >= 10,000)
BOX_PX = 1            # palm box corners and side may differ by this many pixels
MIN_FOREGROUND = 0.005  # every class of the reference must have this share of foreground ...
MIN_CONFIDENT = 0.5     # ... and this share of confident pixels, or the comparison says nothing
FOREGROUND, SPREAD = 0.1, 3.0  # confident heads: foreground share and logit std per class
BUGS = ("shift", "swap", "nofuse")
TARGET = (f"max|dp| <= {MAX_ABS}; confident (|p-t| >= {MARGIN}) flips <= {FLIP_PPM:.0f} ppm per class; "
          f"boxes within {BOX_PX} px; ref foreground >= {MIN_FOREGROUND:.1%}, confident >= {MIN_CONFIDENT:.0%}")
SWAP = (0, 1)         # the class channels --bug swap exchanges
BOX_SIDE = (0.1, 0.15)  # palm box side range (fraction of the image): small crops keep the CPU run short
UPSCALER = "RealESRGAN_x4plus"


# --------------------------------------------------------------------------- comparison

@dataclasses.dataclass
class ProbsDiff:
    """Per-class counts of one comparison (summed over images; `max_abs` is a maximum)."""

    classes: list[str]
    pixels: int = 0
    max_abs: np.ndarray = None          # (C,) largest |p_dev - p_ref|
    confident_flips: np.ndarray = None  # (C,) mask flips where |p - t| >= margin in either run
    near_flips: np.ndarray = None       # (C,) mask flips nearer the threshold
    confident: np.ndarray = None        # (C,) pixels confident in the reference
    ref_positive: np.ndarray = None     # (C,) foreground pixels of the reference

    def __post_init__(self) -> None:
        c = len(self.classes)
        for f in ("max_abs", "confident_flips", "near_flips", "confident", "ref_positive"):
            if getattr(self, f) is None:
                setattr(self, f, np.zeros(c, np.float64))

    def __iadd__(self, o: "ProbsDiff") -> "ProbsDiff":
        self.pixels += o.pixels
        self.max_abs = np.maximum(self.max_abs, o.max_abs)
        for f in ("confident_flips", "near_flips", "confident", "ref_positive"):
            setattr(self, f, getattr(self, f) + getattr(o, f))
        return self

    def flip_ppm(self) -> np.ndarray:
        return self.confident_flips / max(self.pixels, 1) * 1e6


def compare_probs(ref: np.ndarray, dev: np.ndarray, thr, classes, margin: float = MARGIN,
                  ref_masks: np.ndarray | None = None, dev_masks: np.ndarray | None = None) -> ProbsDiff:
    """Compare (C, H, W) probabilities of one image; masks (the CSV's, (C, H, W) bool) default to p > t."""
    if ref.shape != dev.shape:
        raise ValueError(f"probabilities of different shapes: {ref.shape} vs {dev.shape}")
    d = ProbsDiff(list(classes), pixels=int(ref[0].size))
    for c in range(ref.shape[0]):
        a, b, t = ref[c], dev[c], float(thr[c])
        ma = a > t if ref_masks is None else ref_masks[c].astype(bool)
        mb = b > t if dev_masks is None else dev_masks[c].astype(bool)
        flip = ma != mb
        sure = np.maximum(np.abs(a - t), np.abs(b - t)) >= margin
        d.max_abs[c] = float(np.abs(a - b).max())
        d.confident_flips[c] = np.count_nonzero(flip & sure)
        d.near_flips[c] = np.count_nonzero(flip & ~sure)
        d.confident[c] = np.count_nonzero(np.abs(a - t) >= margin)
        d.ref_positive[c] = np.count_nonzero(ma)
    return d


def verdict(d: ProbsDiff, ref_boxes: dict | None = None, dev_boxes: dict | None = None) -> dict:
    """The table row of a comparison: pass, figure, target and the figures as numbers."""
    ppm, fg = d.flip_ppm(), d.ref_positive / max(d.pixels, 1)
    conf = float(d.confident.sum() / max(d.pixels * len(d.classes), 1))
    worst, worst_abs = int(np.argmax(ppm)), int(np.argmax(d.max_abs))
    near = float(d.near_flips.sum() / max(d.pixels * len(d.classes), 1))
    box_px, box_note = box_offset(ref_boxes or {}, dev_boxes or {})
    informative = d.pixels > 0 and float(fg.min()) >= MIN_FOREGROUND and conf >= MIN_CONFIDENT
    ok = (informative and float(d.max_abs.max()) <= MAX_ABS and float(ppm.max()) <= FLIP_PPM
          and box_px is not None and box_px <= BOX_PX)
    figure = (f"max|dp| {d.max_abs.max():.3f} ({d.classes[worst_abs]}); confident flips {ppm.max():.0f} ppm "
              f"({d.classes[worst]}); near-threshold flips {near:.2%}; boxes {box_note}; "
              f"ref foreground >= {fg.min():.1%}, confident {conf:.0%}")
    return {"pass": bool(ok), "figure": figure, "target": TARGET, "max_abs": float(d.max_abs.max()),
            "worst_flip_ppm": float(ppm.max()), "worst_flip_class": d.classes[worst], "near_flip_share": near,
            "box_offset_px": box_px, "ref_foreground_min": float(fg.min()), "confident_share": conf,
            "informative": bool(informative)}


def box_offset(ref: dict, dev: dict) -> tuple[int | None, str]:
    """Largest |difference| of x0, y0, side over the images (None: the runs boxed different images)."""
    if set(ref) != set(dev):
        return None, f"on {len(dev)} image(s) vs {len(ref)} on the reference"
    if not ref:
        return 0, "none (global only)"
    px = max(max(abs(int(a) - int(b)) for a, b in zip(ref[k], dev[k])) for k in ref)
    return px, f"max offset {px} px"


def compare_legs(ref: Path, dev: Path) -> dict:
    """Compare two `leg` folders (probs/*.npz, out.csv, summary.json) image by image."""
    from twostage.classes import CLASSES
    from twostage.fusion import thresholds
    from twostage.inference.probs import probs_file_name, read_probs
    from twostage.rle import decode, read_csv

    thr = thresholds(None).numpy()
    csv = {k: read_csv(p / "out.csv") for k, p in (("ref", ref), ("dev", dev))}
    if set(csv["ref"]) != set(csv["dev"]) or not csv["ref"]:
        raise SystemExit(f"device_compare: the runs wrote different images ({len(csv['ref'])} vs {len(csv['dev'])})")
    total = ProbsDiff(list(CLASSES))
    for name in sorted(csv["ref"]):
        probs, masks = [], []
        for k, leg in (("ref", ref), ("dev", dev)):
            classes, p = read_probs(leg / "probs" / probs_file_name(name))
            if classes != list(CLASSES):
                raise SystemExit(f"device_compare: {leg}: probabilities of classes {classes[:3]}...")
            probs.append(p)
            masks.append(np.stack([decode(csv[k][name][c], p.shape[1:]) for c in CLASSES]))
        total += compare_probs(probs[0], probs[1], thr, CLASSES, ref_masks=masks[0], dev_masks=masks[1])
        del probs, masks
    boxes = [json.loads((leg / "summary.json").read_text()).get("boxes", {}) for leg in (ref, dev)]
    return verdict(total, *boxes)


# --------------------------------------------------------------------------- confident models

def cap_batchnorm(net, x) -> None:
    """Eval-mode batch norm divides by max(1, the variance its input has on `x`): the random
    network's activations stop growing layer by layer (HRNet reached 1e9, beyond fp16) while
    the network stays smooth (full re-normalisation made it chaotic: fp16 then flipped 3 %)."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    def pre(mod, inp):
        v = inp[0].detach().transpose(0, 1).flatten(1)
        if v.shape[1] > 1:
            mod.running_var.copy_(torch.maximum(mod.running_var, v.float().var(1)))

    hooks = [m.register_forward_pre_hook(pre) for m in net.modules() if isinstance(m, _BatchNorm)]
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        for h in hooks:
            h.remove()


def sharpen_head(net, logits, share: float = FOREGROUND, spread: float = SPREAD) -> None:
    """Scale and shift each head channel so that `share` of the pixels of `logits` (1, C, h, w)
    are above 0 and the logits' std is `spread`: confident, like a trained model."""
    import torch
    from torch import nn

    conv = [m for m in net.net.segmentation_head.modules() if isinstance(m, nn.Conv2d)][-1]
    z = logits[0].flatten(1).float()
    z = z[:, :: -(-z.numel() // 2**23)]  # torch.quantile refuses inputs of more than 2**24 values
    q = torch.quantile(z, 1 - share, dim=1)
    k = spread / z.std(1).clamp_min(1e-6)
    with torch.no_grad():
        conv.weight.mul_(k.to(conv.weight).view(-1, *[1] * (conv.weight.ndim - 1)))
        conv.bias.copy_(k.to(conv.bias) * (conv.bias - q.to(conv.bias)))


def _stage_model(stage: str, sets: list[str], extra: dict):
    from twostage.config import load_config
    from twostage.models import build_model
    from twostage.train.run import stage_meta

    cfg = load_config(stage, overrides=["model.encoder_weights=none", *sets])
    net = build_model(cfg.model.arch, cfg.model.encoder, len(cfg.classes), cfg.model.in_channels,
                      **dict(cfg.model.kwargs))
    return net, stage_meta(cfg, extra)


def confident_models(images: Path, out: Path, device: str = "cpu", sets: list[str] = (), weights_dir=None,
                     tile: int = 0, bug: str | None = None, seed: int = 0, upscaler: str = UPSCALER,
                     box_side: tuple[float, float] = BOX_SIDE) -> dict:
    """Global and palm checkpoints of the real stage architectures, made confident on the first
    image of `images`, the palm one recorded with `upscaler` and palm boxes of `box_side`
    (fractions of the image side); with `bug`, what the device runs get instead. Returns
    models.json's dict."""
    import shutil

    import torch

    from twostage.box import DEFAULT_MARGIN, BoxRule
    from twostage.checkpoint import save_checkpoint
    from twostage.classes import CLASSES
    from twostage.inference.chain import TwoStage
    from twostage.inference.infer import find_images
    from twostage.io.files import write_png_atomic
    from twostage.io.images import read_image
    from twostage.models import Predictor
    from twostage.sr.upscale import make_upscaler

    out.mkdir(parents=True, exist_ok=True)
    samples = find_images(images)
    image = read_image(samples[0].image_path)
    x = torch.from_numpy(image)[None]
    torch.manual_seed(seed)
    net, meta = _stage_model("global", list(sets), {})
    pred = Predictor(net, meta, device)
    cap_batchnorm(pred.model, pred.preprocess(x))
    sharpen_head(pred.model, pred.logits_at(x))
    glob = save_checkpoint(out / "global.pt", pred.model.state_dict(), meta)

    rule = BoxRule(margin=DEFAULT_MARGIN, side_min=box_side[0], side_max=box_side[1],
                   fallback=(0.5, 0.6, sum(box_side) / 2))
    record = {**make_upscaler(upscaler, weights_dir=weights_dir).record(), "context": 1.5}
    net, pmeta = _stage_model("palm", list(sets), {"box_rule": rule.to_dict(), "palm_set": record})
    raw = save_checkpoint(out / "palm-raw.pt", net.state_dict(), pmeta)
    chain = TwoStage.build(glob, raw, device=device, upscaler_tile=tile, weights_dir=weights_dir, calibration="none")
    with torch.no_grad():
        native = chain.native(image[None])
    box = chain.boxes(native, [samples[0].name], image.shape)[0]
    crop = chain.palm.crop_upscaled(image, box)[None]
    pp = chain.palm.predictor
    cap_batchnorm(pp.model, pp.preprocess(crop))
    sharpen_head(pp.model, pp.logits_at(crop))
    palm = save_checkpoint(out / "palm.pt", pp.model.state_dict(), pmeta)
    raw.unlink()

    info = {"global": str(glob), "palm": str(palm), "images": str(images),
            "box": [int(box.x0), int(box.y0), int(box.side)], "bug": bug,
            "device_images": str(images), "device_global": str(glob), "device_fuse": True}
    if bug == "shift":  # the device reads every image moved one pixel to the right
        moved = out / "shifted"
        shutil.rmtree(moved, ignore_errors=True)
        for s in samples:
            img = read_image(s.image_path)
            img[:, 1:] = img[:, :-1].copy()
            write_png_atomic(moved / s.rel, img)
        info["device_images"] = str(moved)
    elif bug == "swap":  # the device's global model has two class channels exchanged
        from twostage.checkpoint import load_checkpoint

        ck = load_checkpoint(glob, map_location="cpu")
        sd = ck["state_dict"]
        i, j = SWAP
        for k in [k for k in sd if k.startswith("net.segmentation_head.")]:
            if sd[k].shape[:1] == (len(CLASSES),):
                sd[k] = sd[k].clone()
                sd[k][[i, j]] = sd[k][[j, i]]
        info["device_global"] = str(save_checkpoint(out / "global-swapped.pt", sd, ck["meta"]))
    elif bug == "nofuse":  # the device runs the global model alone
        info["device_fuse"] = False
    elif bug is not None:
        raise SystemExit(f"device_compare: --bug {bug!r}: use one of {', '.join(BUGS)}")
    (out / "models.json").write_text(json.dumps(info, indent=1))
    return info


# --------------------------------------------------------------------------- one run

def emulate_autocast(dtype: str) -> None:
    """Run the networks under CPU autocast to `dtype` (float16, bfloat16): what a half-precision
    device does to the numbers, measurable without one (the chain allows fp16 on CUDA only)."""
    import torch

    from twostage import models

    def _forward(self, x, tta, fp16):
        with torch.autocast("cpu", dtype=getattr(torch, dtype)):
            out = self.model(x).float()
            if tta:
                out = 0.5 * (out + self.model(x.flip(-1)).float().flip(-1))
        return out

    models.Predictor._forward = _forward


def run_leg(images: Path, global_ckpt: Path, palm_ckpt: Path | None, device: str, fp16: bool, out: Path,
            tile: int = 0, weights_dir=None, autocast: str | None = None) -> dict:
    """`twostage infer [--fuse]` with --save-probs into `out`, through the library call the CLI
    makes; summary.json adds the peak GPU memory."""
    import torch

    from twostage.inference.infer import infer

    if autocast:
        emulate_autocast(autocast)
    out.mkdir(parents=True, exist_ok=True)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    summary = infer(images, global_ckpt, out / "out.csv", palm_ckpt=palm_ckpt, fuse=palm_ckpt is not None,
                    save_probs=out / "probs", device=device, fp16=fp16, upscaler_tile=tile,
                    weights_dir=weights_dir, calibration="none")
    if cuda:
        torch.cuda.synchronize(device)
    info = {**summary.to_dict(), "wall_s": time.perf_counter() - t,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    (out / "summary.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models", help="confident global and palm checkpoints (and the --bug inputs)")
    m.add_argument("--images", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--device", default="cpu")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stage config override")
    m.add_argument("--weights-dir", type=Path)
    m.add_argument("--tile", type=int, default=0)
    m.add_argument("--bug", choices=BUGS)
    leg = sub.add_parser("leg", help="one infer run with saved probabilities")
    leg.add_argument("--images", type=Path, required=True)
    leg.add_argument("--global", dest="global_ckpt", type=Path, required=True)
    leg.add_argument("--palm", dest="palm_ckpt", type=Path, help="fuse with this palm checkpoint")
    leg.add_argument("--device", default="cpu")
    leg.add_argument("--fp16", action="store_true")
    leg.add_argument("--tile", type=int, default=0)
    leg.add_argument("--weights-dir", type=Path)
    leg.add_argument("--out", type=Path, required=True)
    leg.add_argument("--cpu-autocast", choices=("float16", "bfloat16"),
                     help="emulate a half-precision device on the CPU")
    c = sub.add_parser("compare", help="compare two leg folders")
    c.add_argument("ref", type=Path)
    c.add_argument("dev", type=Path)
    c.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "models":
        info = confident_models(a.images, a.out, a.device, a.set, a.weights_dir, a.tile, a.bug)
    elif a.cmd == "leg":
        info = run_leg(a.images, a.global_ckpt, a.palm_ckpt, a.device, a.fp16, a.out, a.tile, a.weights_dir,
                       a.cpu_autocast)
        info = {k: info[k] for k in ("images", "fused", "device", "wall_s", "peak_gpu_gib", "boxes")}
    else:
        info = compare_legs(a.ref, a.dev)
        if a.json:
            a.json.write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
