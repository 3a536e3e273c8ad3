"""`twostage demo`: synth → prepare-sr → train global → train palm → global vs fused, scored."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole product on synthetic hands and show what the palm stage adds",
        description="One command, no arguments: makes phantom hand radiographs (a training set and a "
                    "held-out set with another seed), builds the super-resolved palm set (Real-ESRGAN "
                    "if its weights are in weights/, else an X-ray super-resolution network it trains on "
                    "the phantoms first, said plainly), trains the global and "
                    "the palm model with stages/demo-*.yaml, runs inference global-only and fused on the "
                    "held-out set, scores both and writes a side-by-side table and pictures. 5 to 15 "
                    "minutes on a 2-core CPU; --quick 2 to 5 (a smoke test, not the claim).",
    )
    p.add_argument("--out", type=Path, default=Path("twostage-demo"), help="output folder (default: %(default)s)")
    p.add_argument("--size", type=int, default=512, help="phantom image size in pixels (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny data and few epochs: checks the chain in minutes")
    p.add_argument("--seed", type=int, default=0, help="seed of data and training (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier demo in --out (otherwise a non-empty --out is an error)")
    p.add_argument("--weights-dir", type=Path, help="folder with Real-ESRGAN weights (default: weights/)")
    p.add_argument("--upscaler", default="auto",
                   help="auto (RealESRGAN_x4plus if its weights are there, else train one with train-sr into "
                        "OUT/weights), bicubic, or any upscaler name (default: auto)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..demo import hand_commands, run_demo

    result = run_demo(args.out, size=args.size, quick=args.quick, seed=args.seed, device=args.device,
                      weights_dir=args.weights_dir, overwrite=args.overwrite, upscaler=args.upscaler)
    ev, times = result.evaluation, result.times
    print()
    if result.sr is not None:
        from ..sr.quality import quality_table

        print(f"super-resolution: {result.upscaler} trained on the demo's training images "
              f"({result.sr.step} steps), held-out PSNR / SSIM against bicubic:\n"
              + quality_table(result.sr.quality))
    print(f"held-out set: {result.heldout}  (upscaler: {result.upscaler})")
    print(ev.table())
    which = "calibrated" if ev.calibrated_report is not None else "fused"
    print(f"\ncarpal mean Dice: global {ev.global_report.carpal_mean:.4f} -> {which} "
          f"{ev.best.carpal_mean:.4f} ({ev.carpal_gain:+.4f}); overall "
          f"{ev.global_report.overall:.4f} -> {ev.best.overall:.4f} ({ev.overall_gain:+.4f})")
    print(f"calibrated on {result.calibration.n_images} validation image(s): {result.calibration.files[-1]}")
    print("\ntime per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; total {sum(times.values()) / 60:.1f} min")
    print("\nwritten:")
    for path in [result.data, result.heldout, *([result.sr.path] if result.sr else []),
                 result.palm_data, *result.runs.values(),
                 *ev.files.values()]:
        print(f"  {path}")
    print("\neach step by hand:\n" + "\n".join("  " + c for c in hand_commands(result).splitlines()))
    return 0
