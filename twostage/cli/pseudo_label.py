"""`twostage pseudo-label IMAGES --out DIR (--csv PRED.csv | --global CKPT [--palm CKPT --fuse])`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_chain_options, add_prediction_source, chain_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pseudo-label",
        help="turn predictions on unlabelled images into a training set (polygon JSON + pseudo.json)",
        description="Write the predictions of the PNGs under IMAGES as a dataset: OUT/train/DCM/<ID>/<name>.png "
                    "(a link to the original, or a copy with --copy) and OUT/train/outputs_json/<ID>/<name>.json "
                    "(one polygon per connected component of each predicted class, holes kept), so train, "
                    "check and evaluate read it like annotated data. The predictions come from a CSV in the "
                    "submission format (any model, fusion or ensemble; it needs a row for every image and "
                    "class, rows for other images are ignored with a warning) or from checkpoints run as "
                    "`twostage infer` runs them. With probabilities (checkpoints, or --probs next to a CSV) "
                    "each class gets a confidence (the mean probability of its pixels at p >= 0.5, or 1 - the "
                    "highest probability when it has none) and each image the mean over the classes; "
                    "--min-confidence T leaves out the classes below T and the images below T. OUT/pseudo.json "
                    "records the source, the confidences and what was left out, and marks the folder as "
                    "pseudo-labelled. OUT must be new or empty; it appears complete or not at all.",
    )
    p.add_argument("images", type=Path, metavar="IMAGES",
                   help="a folder of PNGs (recursive) or a dataset root (uses test/DCM, else train/DCM)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the dataset to write (new or empty folder)")
    add_prediction_source(p, "prediction CSV to turn into annotations",
                          "palm-stage checkpoint or run folder (used with --fuse)")
    p.add_argument("--probs", type=Path, metavar="DIR",
                   help="with --csv: the `infer --save-probs` folder of the same predictions, for the confidence")
    p.add_argument("--min-confidence", type=float, metavar="T",
                   help="0 < T < 1: leave out classes (listed in pseudo.json) and images whose confidence is below T")
    p.add_argument("--copy", action="store_true", help="copy the PNGs instead of linking to them")
    p.add_argument("--split", choices=("train", "test"), help="which split of a dataset root to read (default: test, else train)")
    add_chain_options(p)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..inference.pseudo import pseudo_label

    result = pseudo_label(args.images, args.out, csv=args.csv, global_ckpt=args.global_ckpt, palm_ckpt=args.palm_ckpt,
                          fuse=args.fuse, probs=args.probs, min_confidence=args.min_confidence, copy=args.copy,
                          split=args.split, **chain_options(args))
    print(f"wrote {result.out}: {result.images} image(s) with pseudo-labels, {result.seconds:.1f} s")
    if result.dropped_images:
        print(f"left out {len(result.dropped_images)} image(s) below --min-confidence {args.min_confidence}")
    if result.dropped_classes:
        n = sum(len(v) for v in result.dropped_classes.values())
        print(f"left out {n} class(es) in {len(result.dropped_classes)} image(s) below --min-confidence "
              f"{args.min_confidence}")
    print(f"record: {result.record}")
    return 0
