"""Training-data loading: mask cache vs rasterising every sample, side by side in one run.

    python benchmarks/loader.py [--n 6] [--size 2048] [--repeats 3]

Writes a synthetic dataset (`twostage.synth`) to a temporary folder, fills the mask cache
once (timed separately), then times, over the same samples in the same process:
  cached   read PNG + load_masks(cache=MaskCache)          (the training path)
  uncached read PNG + read JSON + rasterize                 (re-rasterising every epoch)
and the mask part alone (without the PNG read), since PNG decoding is the same in both; then
the training dataset itself (`twostage.train.GlobalDataset`, without augmentation, which
costs the same on both paths) with
`data.preload` (images and masks decoded and resized to the input size once) against
decoding and rasterising every sample at every step.
`--densify K` puts K interpolated points on every polygon edge, to mimic hand-drawn
annotation files with many more points than the phantom's polygons.
Reports samples/s (best of `--repeats` passes) and the ratios.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from twostage.data import (Annotation, MaskCache, find_samples, load_masks, rasterize, read_annotations,
                           write_annotations)
from twostage.io import read_image
from twostage.synth import synthesize


def best_rate(fn, samples, repeats: int) -> float:
    """Samples per second of `fn(sample)` over all samples, best of `repeats` passes."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for s in samples:
            fn(s)
        best = min(best, time.perf_counter() - t)
    return len(samples) / best


def densify(points: np.ndarray, k: int) -> np.ndarray:
    """The polygon with k points per edge (integer pixels, same shape)."""
    nxt = np.roll(points, -1, axis=0)
    t = np.arange(k)[None, :, None] / k
    return np.rint(points[:, None] + (nxt - points)[:, None] * t).reshape(-1, 2).astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=6, help="training images")
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported")
    ap.add_argument("--input-size", type=int, default=512, help="network input size of the dataset path")
    ap.add_argument("--densify", type=int, default=1, help="points per polygon edge (1: as synthesised)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = synthesize(Path(tmp) / "data", n=args.n, size=args.size, seed=0)
        samples = find_samples(root)
        if args.densify > 1:
            for s in samples:
                anns = [Annotation(a.label, densify(a.points, args.densify), a.id)
                        for a in read_annotations(s.json_path)]
                write_annotations(s.json_path, anns, s.name, (args.size, args.size))
        cache = MaskCache(Path(tmp) / "cache")

        t = time.perf_counter()
        for s in samples:
            load_masks(s, cache=cache)
        fill = (time.perf_counter() - t) / len(samples)
        for s in samples:  # the cache returns exactly what rasterising gives
            np.testing.assert_array_equal(load_masks(s, cache=cache),
                                          rasterize(read_annotations(s.json_path), read_image(s.image_path).shape))
        cache_bytes = sum(p.stat().st_size for p in cache.dir.glob("*.npz")) / len(samples)
        json_kib = sum(s.json_path.stat().st_size for s in samples) / len(samples) / 1024
        points = sum(len(a.points) for s in samples for a in read_annotations(s.json_path)) / len(samples)

        def uncached(s):
            img = read_image(s.image_path)
            return img, rasterize(read_annotations(s.json_path), img.shape)

        def cached(s):
            return read_image(s.image_path), load_masks(s, cache=cache)

        shape = read_image(samples[0].image_path).shape
        from twostage.config import load_config
        from twostage.train import GlobalDataset

        cfg = load_config("global", data=str(root), input_size=args.input_size)
        cfg.data.preload = True
        preloaded = GlobalDataset(cfg, samples, None, cache, augment=False)
        cfg.data.preload = False
        rasterising = GlobalDataset(cfg, samples, None, None, augment=False)
        items = list(range(len(samples)))
        rates = {
            "cached (PNG + cached masks)": best_rate(cached, samples, args.repeats),
            "uncached (PNG + JSON + rasterize)": best_rate(uncached, samples, args.repeats),
            "masks only, cached": best_rate(lambda s: load_masks(s, cache=cache), samples, args.repeats),
            "masks only, JSON + rasterize": best_rate(lambda s: rasterize(read_annotations(s.json_path), shape),
                                                      samples, args.repeats),
            "PNG read only": best_rate(lambda s: read_image(s.image_path), samples, args.repeats),
            f"dataset item, preloaded ({args.input_size}px)": best_rate(preloaded.__getitem__, items, args.repeats),
            "dataset item, rasterise every step": best_rate(rasterising.__getitem__, items, args.repeats),
        }

    print(f"{len(samples)} images {args.size}x{args.size}, 29 classes, {points:.0f} polygon points/image "
          f"({json_kib:.0f} KiB JSON); "
          f"{platform.processor() or platform.machine()}, best of {args.repeats}")
    print(f"cache fill: {fill * 1000:.1f} ms/image, {cache_bytes / 1024:.0f} KiB/image on disk "
          f"(raw masks {29 * args.size * args.size / 2**20:.0f} MiB)")
    for name, r in rates.items():
        print(f"  {name:36s} {r:8.1f} samples/s  {1000 / r:7.1f} ms/sample")
    names = list(rates)
    print(f"speed-up full sample (PNG + masks): {rates[names[0]] / rates[names[1]]:.2f}x")
    print(f"speed-up mask part alone:           {rates[names[2]] / rates[names[3]]:.2f}x")
    print(f"speed-up training dataset item:     {rates[names[5]] / rates[names[6]]:.2f}x")


if __name__ == "__main__":
    main()
