"""Benchmark: `twostage infer` streams images, so its peak memory does not grow with their number.

Runs `python -m twostage infer` global-only and fused, each in a fresh child process, on the
first N of a set of synthetic 2048² phantoms for every N in --counts, and prints the peak RSS
of each child (os.wait4's ru_maxrss: that child alone). Flat means peak RSS at the largest N
≈ peak RSS at the smallest (the script exits 1 if it grows by more than --tolerance).

Models: tiny random-init checkpoints (the tests' shape: Unet + mobilenetv3-small, input 64) so
the figure is the streaming pipeline's, not a big network's; pass --global/--palm for real ones.
The phantoms are synthesized once into --cache (default /tmp/twostage-rss) and reused.

    .venv/bin/python benchmarks/stream_rss.py --counts 10,200
    .venv/bin/python benchmarks/stream_rss.py --counts 10,50,100   # a slow machine
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from twostage.box import BoxRule
from twostage.checkpoint import save_checkpoint
from twostage.classes import CLASSES, PALM_CLASSES
from twostage.models import build_model
from twostage.pretrained import default_normalization
from twostage.sr.upscale import make_upscaler

TINY_MODEL = {"arch": "Unet", "encoder": "tu-mobilenetv3_small_050", "in_channels": 3,
              "kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}


def tiny_checkpoint(path: Path, stage: str) -> Path:
    """A random-init tiny network saved as a real checkpoint (palm: bicubic x4 palm set)."""
    classes = PALM_CLASSES if stage == "palm" else CLASSES
    torch.manual_seed(0)
    net = build_model(TINY_MODEL["arch"], TINY_MODEL["encoder"], len(classes), 3, **TINY_MODEL["kwargs"])
    meta = {"stage": stage, "classes": list(classes), "model": TINY_MODEL, "input_size": 64,
            "normalization": default_normalization(None)}
    if stage == "palm":
        meta.update(box_rule=BoxRule(margin=0.15, side_min=0.1, side_max=0.6, fallback=(0.5, 0.6, 0.3)).to_dict(),
                    palm_set={**make_upscaler("bicubic", 4).record(), "context": 1.5})
    return save_checkpoint(path, net.state_dict(), meta)


def image_folders(cache: Path, counts: list[int], size: int) -> dict[int, Path]:
    """cache/imgs<N>/ holding hard links to the first N phantoms (synthesized once)."""
    from twostage.data.synth import synthesize

    data = cache / f"DATA-{size}-{max(counts)}"
    if not (data / "test" / "DCM").is_dir():
        t = time.perf_counter()
        synthesize(data, n=1, size=size, seed=0, test_n=max(counts))
        print(f"synthesized {max(counts)} phantoms {size}² in {time.perf_counter() - t:.0f} s")
    pngs = sorted((data / "test" / "DCM").rglob("*.png"))
    folders = {}
    for n in counts:
        d = cache / f"imgs-{size}-{n}"
        if not d.is_dir() or len(list(d.glob("*.png"))) != n:
            d.mkdir(parents=True, exist_ok=True)
            for p in pngs[:n]:
                if not (d / p.name).exists():
                    os.link(p, d / p.name)
        folders[n] = d
    return folders


def peak_rss(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of `python -m twostage <args>` in a fresh child."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "twostage", "-q", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"infer failed ({proc.returncode}): {err.strip()[-400:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t  # ru_maxrss is KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="10,200", help="image counts to compare (default 10,200)")
    ap.add_argument("--size", type=int, default=2048, help="phantom side in pixels (default 2048)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/twostage-rss"), help="where phantoms are kept")
    ap.add_argument("--global", dest="global_ckpt", type=Path, help="global checkpoint (default: tiny random)")
    ap.add_argument("--palm", type=Path, help="palm checkpoint (default: tiny random)")
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed growth of the peak (default 10 %%)")
    args = ap.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    args.cache.mkdir(parents=True, exist_ok=True)
    g = args.global_ckpt or tiny_checkpoint(args.cache / "global.pt", "global")
    p = args.palm or tiny_checkpoint(args.cache / "palm.pt", "palm")
    folders = image_folders(args.cache, counts, args.size)
    modes = {"global-only": ["--global", str(g)], "fused": ["--global", str(g), "--palm", str(p), "--fuse"]}
    print(f"{'mode':<12} {'images':>6} {'peak RSS MiB':>13} {'wall s':>7} {'s/img':>6}")
    flat = True
    for mode, extra in modes.items():
        peaks = {}
        for n in counts:
            rss, wall = peak_rss(["infer", str(folders[n]), *extra, "--out", str(args.cache / f"{mode}-{n}.csv")])
            peaks[n] = rss
            print(f"{mode:<12} {n:>6} {rss:>13.0f} {wall:>7.1f} {wall / n:>6.2f}", flush=True)
        growth = peaks[counts[-1]] / peaks[counts[0]] - 1
        print(f"{mode:<12} peak at {counts[-1]} / peak at {counts[0]}: {1 + growth:.3f}")
        flat &= growth <= args.tolerance
    print("memory flat" if flat else f"memory GROWS by more than {args.tolerance:.0%}")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
