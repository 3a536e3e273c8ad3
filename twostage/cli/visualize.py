"""`twostage visualize DATA (--csv PRED.csv | --global CKPT [--palm CKPT --fuse]) --out DIR`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_chain_options, add_prediction_source, chain_options, parse_classes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "visualize",
        help="pictures of predictions against the ground truth: GT, prediction, overlap",
        description="For every annotated image of DATA, write OUT/<image>.png: ground truth | prediction "
                    "(class colours) | overlap (green: both, red: prediction only, blue: ground truth only), "
                    "with the palm box, the Dice over the drawn classes and a class legend. The prediction "
                    "comes from a CSV (its palm box is derived from its carpal masks) or from checkpoints "
                    "run like `twostage infer`. --per-class adds OUT/<image>/<class>.png, zoomed on each "
                    "class the prediction gets wrong.",
    )
    p.add_argument("data", type=Path, metavar="DATA", help="dataset root or split folder with annotations")
    add_prediction_source(p, "prediction CSV to draw",
                          "palm checkpoint: its box is drawn; with --fuse its prediction is fused in")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the PNGs")
    p.add_argument("--image", nargs="+", metavar="NAME", help="only these images (file names or stems)")
    p.add_argument("--classes", type=parse_classes, default=None, metavar="all|palm|NAMES",
                   help="classes to draw: 'all' (default), 'palm' or a comma-separated list")
    p.add_argument("--per-class", action="store_true", help="also one zoomed picture per class with errors")
    p.add_argument("--split", choices=("train", "test"), help="split of a dataset root (default: train)")
    p.add_argument("--fixes", type=Path, metavar="FIXES.yaml", help="label fixes applied to the ground truth")
    add_chain_options(p)
    p.add_argument("--max-side", type=int, default=1024, metavar="PX",
                   help="panels wider than this are scaled down (default 1024)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..evaluation.visualize import visualize

    summary = visualize(
        args.data, args.out, csv=args.csv, global_ckpt=args.global_ckpt, palm_ckpt=args.palm_ckpt,
        fuse=args.fuse, images=args.image, classes=args.classes, per_class=args.per_class,
        split=args.split, fixes=args.fixes, max_side=args.max_side, **chain_options(args),
    )
    print(f"wrote {len(summary.files)} picture(s) for {summary.images} image(s) to {summary.out}")
    if summary.skipped:
        print(f"{len(summary.skipped)} image(s) without ground truth skipped")
    return 0
