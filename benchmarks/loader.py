"""Training input: the per-item pipeline of before the cache against the cached one, side by
side in one run, at the real configs.

    python benchmarks/loader.py [--n 8] [--size 2048] [--stages global palm] [--repeats 2]

Writes phantoms (`twostage.data.synth`, 2048²) and their palm crops (`prepare-sr`, bicubic x4:
the crop size RealESRGAN_x4plus gives, ~3000²) to a temporary folder; then, for
stages/global.yaml and stages/palm.yaml (their input size, augmentation and batch size),
times in this one process, i.e. what one DataLoader worker delivers:

  old   the pipeline before the cache, per item: decode the PNG, read its source-size masks
        (already rasterised: the mask cache), resize image and masks to the input size (palm:
        the jittered box cut from the upscaled crop first), albumentations on the image and
        every mask (its code is kept below, as it was)
  new   an item cut from the training-input cache, and its share of the collate
  batch the new pipeline's other half, the batch made from the collated items (densified,
        resampled, CLAHE, brightness/contrast): on the training device, here the CPU
        (`benchmarks/gpu_check.py` times it on a GPU)

and the one-time cost of the cache: seconds per image in one process and MiB per image on
disk. Reports items/s (best of `--repeats` passes over the images) and the ratios.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch

from twostage.box import crop_image, jitter_box
from twostage.config import load_config
from twostage.data.layout import find_samples
from twostage.data.masks import MaskCache, load_masks
from twostage.data.synth import synthesize
from twostage.io.images import read_image
from twostage.models import input_hw, resize_images
from twostage.sr.prepare import prepare_sr
from twostage.train import GlobalDataset, PalmDataset, collate, item_rng, load_palm_items, make_batch


def old_augment(aug):
    """The albumentations pipeline the training items went through before the cache."""
    try:
        import albumentations as A
    except ImportError:
        raise SystemExit("benchmarks/loader.py: the old pipeline needs albumentations: pip install -e '.[bench]'")
    import cv2

    return A.Compose([
        A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=aug.clahe),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=aug.brightness),
        A.Affine(scale=(1 - aug.scale, 1 + aug.scale), translate_percent=(-aug.shift, aug.shift),
                 rotate=(-aug.rotate, aug.rotate), interpolation=cv2.INTER_LINEAR,
                 mask_interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, p=aug.affine_p),
        A.HorizontalFlip(p=aug.hflip),
    ])


def old_item(image: np.ndarray, masks: np.ndarray, size: tuple[int, int], augment, rng) -> tuple:
    """Resize to the input size (masks as float planes), then augment: the old per-item work."""
    img = resize_images(torch.from_numpy(image)[None, None].float(), size)[0, 0]
    msk = resize_images(torch.from_numpy(masks)[None].float() * 255.0, size)[0]
    image = img.round().clamp(0, 255).to(torch.uint8).numpy()
    masks = msk.round().clamp(0, 255).to(torch.uint8).numpy()
    augment.set_random_seed(int(rng.integers(2**31 - 1)))
    out = augment(image=image, masks=list(masks))
    return torch.from_numpy(out["image"]), torch.from_numpy(np.stack(out["masks"])).float().div_(255.0)


def best_rate(fn, n: int, repeats: int) -> float:
    """Items per second of `fn()` (which makes n items), best of `repeats` passes."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def stage_figures(stage: str, root: Path, tmp: Path, repeats: int) -> dict:
    cfg = load_config(stage, data=str(root), device="cpu")
    size, batch = input_hw(cfg.model.input_size), cfg.train.batch_size
    samples = [s for s in find_samples(root) if s.json_path is not None]
    masks_cache = MaskCache(tmp / f"{stage}-masks")
    for s in samples:  # the old path read rasterised masks from this cache
        load_masks(s, cfg.classes, None, masks_cache)
    augment = old_augment(cfg.aug)
    if stage == "palm":
        items = load_palm_items(root, samples)
        ds = PalmDataset(cfg, items, None, augment=True, jitter=True)

        def old_one(i: int):
            it, rng = items[i], item_rng(0, 0, i)
            image, masks = read_image(it.sample.image_path), load_masks(it.sample, cfg.classes, None, masks_cache)
            box = jitter_box(it.box, rng, cfg.box.jitter_shift, cfg.box.jitter_scale, (it.context_side,) * 2)
            return old_item(crop_image(image, box, it.scale), crop_image(masks, box, it.scale), size, augment, rng)
    else:
        ds = GlobalDataset(cfg, samples, None, augment=True)

        def old_one(i: int):
            s = samples[i]
            return old_item(read_image(s.image_path), load_masks(s, cfg.classes, None, masks_cache), size, augment,
                            item_rng(0, 0, i))

    n = len(ds)
    t = time.perf_counter()
    cache = ds.attach_cache(tmp / "inputs", workers=0)
    build = (time.perf_counter() - t) / n
    batches = [list(range(k, min(n, k + batch))) for k in range(0, n, batch)]
    collated = [collate([ds[(0, i)] for i in b]) for b in batches]
    return {
        "stage": stage, "input": size, "images": n, "batch": batch,
        "build_s": build, "mib": cache.nbytes / n / 2**20,
        "old": best_rate(lambda: [old_one(i) for i in range(n)], n, repeats),
        "new": best_rate(lambda: [collate([ds[(0, i)] for i in b]) for b in batches], n, repeats),
        "batch_cpu": best_rate(lambda: [make_batch(c, size, torch.device("cpu")) for c in collated], n, repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8, help="training images")
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels")
    ap.add_argument("--stages", nargs="+", default=["global", "palm"], choices=["global", "palm"])
    ap.add_argument("--repeats", type=int, default=2, help="timed passes; the best is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as in a DataLoader worker)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthesize(tmp / "data", n=args.n, size=args.size, seed=0)
        palm = tmp / "palm"
        if "palm" in args.stages:
            prepare_sr(data, palm, upscaler="bicubic", scale=4)
        for stage in args.stages:
            rows.append(stage_figures(stage, palm if stage == "palm" else data, tmp, args.repeats))

    print(f"{args.n} phantoms of {args.size}², palm crops bicubic x4; {platform.processor() or platform.machine()}, "
          f"{args.threads} torch thread(s), best of {args.repeats}")
    print(f"{'stage':7s} {'input':>6s} {'old items/s':>12s} {'new items/s':>12s} {'ratio':>7s} "
          f"{'batch on CPU items/s':>21s} {'cache build s/img':>18s} {'cache MiB/img':>14s}")
    for r in rows:
        print(f"{r['stage']:7s} {r['input'][0]:6d} {r['old']:12.2f} {r['new']:12.1f} {r['new'] / r['old']:6.0f}x "
              f"{r['batch_cpu']:21.1f} {r['build_s']:18.2f} {r['mib']:14.2f}")


if __name__ == "__main__":
    main()
