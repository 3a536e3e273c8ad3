"""Benchmark the exported chain: `infer --exported DIR --backend onnxruntime` against the
PyTorch chain on the same images and models, on the CPU, side by side in one run.

Per image size (the demo's 512² and 2048²): seconds per image of each backend (best of
`--rounds`, after a warm-up image), its steps that run networks (global, upscale, palm), the
ratio PyTorch / ONNX Runtime, and the agreement of the two CSVs (smallest per-class Dice).

Models: the demo's (Unet + efficientnet-lite0, global and palm input 160, compact SRVGG x4
upscaler of stages/demo-sr.yaml) random-initialised, the heads biased as in
benchmarks/infer.py so ~10 % of pixels are foreground; or a trained `twostage demo` output
with --demo DIR (its runs/global, runs/palm and weights/).

    .venv/bin/python benchmarks/onnx.py --sizes 512,2048 --images 4
    .venv/bin/python benchmarks/onnx.py --demo twostage-demo --sizes 512,2048
"""
# ruff: noqa: E402 - the imports follow the sys.path fix below
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# this file is onnx.py: run as a script, its folder would shadow the onnx package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np
import torch
import yaml

from twostage.checkpoint import load_checkpoint, save_checkpoint
from twostage.classes import CLASSES, PALM_CLASSES
from twostage.data.layout import find_samples
from twostage.data.synth import synthesize
from twostage.inference.chain import TwoStage
from twostage.inference.export import export
from twostage.inference.infer import run
from twostage.inference.onnx_backend import exported_chain
from twostage.io.files import sha256_file
from twostage.io.images import read_image
from twostage.rle import decode, read_csv
from twostage.sr.compat import import_basicsr
from twostage.sr.upscale import make_upscaler


def _bench_infer():
    """benchmarks/infer.py (its biased random demo-architecture models), loaded by path."""
    spec = importlib.util.spec_from_file_location("bench_infer", HERE / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SR = {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 32, "num_conv": 8, "upscale": 4, "act_type": "prelu"}
"""The demo's upscaler (stages/demo-sr.yaml)."""

NETWORK_STEPS = ("global", "upscale", "palm")


def random_pair(tmp: Path, sample: np.ndarray) -> tuple[Path, Path, Path]:
    """Random demo-architecture global and palm checkpoints, the palm one recording a random
    demo-size SRVGG upscaler (written with its manifest into tmp/weights)."""
    weights = tmp / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    torch.save({"params_ema": import_basicsr()[1](**SR).state_dict()}, weights / "demo-sr.pth")
    entry = {"file": "demo-sr.pth", "arch": "SRVGGNetCompact", "scale": 4, "url": "https://example.invalid/demo-sr.pth",
             "sha256": sha256_file(weights / "demo-sr.pth"), "params": SR}
    (weights / "manifest.yaml").write_text(yaml.safe_dump({"weights": {"demo-sr": entry}}))
    make_checkpoint = _bench_infer().make_checkpoint
    g = make_checkpoint(tmp / "g.pt", "global", CLASSES, 160, sample, 0)
    p = make_checkpoint(tmp / "p.pt", "palm", PALM_CLASSES, 160, sample, 1)
    obj = load_checkpoint(p)
    meta = {**obj["meta"], "palm_set": {**make_upscaler("demo-sr", weights_dir=weights).record(), "context": 1.5}}
    return g, save_checkpoint(p, obj["state_dict"], meta), weights


def min_dice(a: Path, b: Path, shape) -> float:
    """Smallest per-class Dice between two CSVs' masks, pooled over images (1: both empty)."""
    ra, rb = read_csv(a), read_csv(b)
    worst = 1.0
    for c in CLASSES:
        inter = total = 0
        for name in ra:
            ma, mb = decode(ra[name][c], shape), decode(rb[name][c], shape)
            inter, total = inter + int((ma & mb).sum()), total + int(ma.sum() + mb.sum())
        worst = min(worst, 1.0 if total == 0 else 2 * inter / total)
    return worst


def timed(chain: TwoStage, samples, out: Path, rounds: int) -> dict:
    """Seconds per image (total and network steps), best of `rounds` after one warm-up image."""
    run(chain, samples[:1], out)
    best = None
    for _ in range(rounds):
        s = run(chain, samples, out)
        t = {"total": s.seconds / len(samples), **{k: s.timings[k] / len(samples) for k in NETWORK_STEPS}}
        best = t if best is None or t["total"] < best["total"] else best
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512,2048", help="phantom sizes, comma-separated (default 512,2048)")
    ap.add_argument("--images", type=int, default=4, help="images per size")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs per backend (best kept)")
    ap.add_argument("--demo", type=Path, help="a `twostage demo` output: its trained models instead of random ones")
    ap.add_argument("--fp16", action="store_true", help="export float16 networks")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = ap.parse_args()
    import onnxruntime as ort

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as d:
        tmp = Path(d)
        sizes = [int(s) for s in args.sizes.split(",")]
        roots = {s: synthesize(tmp / f"DATA{s}", n=args.images, size=s, seed=0) for s in sizes}
        if args.demo is not None:
            g, p, weights = args.demo / "runs" / "global", args.demo / "runs" / "palm", args.demo / "weights"
        else:
            g, p, weights = random_pair(tmp, read_image(find_samples(roots[sizes[0]], "train")[0].image_path))
        t0 = time.perf_counter()
        export(g, tmp / "exported", palm_ckpt=p, weights_dir=weights, fp16=args.fp16)
        export_s = time.perf_counter() - t0
        print(f"export {export_s:.1f} s; torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"onnxruntime {ort.__version__}; models: {'trained ' + str(args.demo) if args.demo else 'random demo'}")
        chains = {"pytorch": TwoStage.build(g, p, weights_dir=weights), "onnxruntime": exported_chain(tmp / "exported")}
        for size in sizes:
            samples = find_samples(roots[size], "train")[:args.images]
            row = {"size": size, "images": len(samples)}
            for name, chain in chains.items():
                row[name] = timed(chain, samples, tmp / f"{name}.csv", args.rounds)
            row["speedup"] = row["pytorch"]["total"] / row["onnxruntime"]["total"]
            row["min_class_dice"] = min_dice(tmp / "pytorch.csv", tmp / "onnxruntime.csv", (size, size))
            results.append(row)

    print(f"\n{'size':>6} {'backend':>12} {'s/image':>8} " + " ".join(f"{k:>8}" for k in NETWORK_STEPS))
    for row in results:
        for name in ("pytorch", "onnxruntime"):
            t = row[name]
            print(f"{row['size']:>5}² {name:>12} {t['total']:8.3f} " + " ".join(f"{t[k]:8.3f}" for k in NETWORK_STEPS))
        print(f"{'':>6} {'ratio':>12} {row['speedup']:7.2f}x  (PyTorch / ONNX Runtime); smallest per-class Dice "
              f"of the CSVs {row['min_class_dice']:.5f}")
    if args.json:
        args.json.write_text(json.dumps({"export_s": export_s, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
