"""`twostage ensemble --csv A.csv B.csv C.csv --out OUT.csv` (hard voting) or
`twostage ensemble --probs DIR1 DIR2 --out OUT.csv` (soft voting)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_device, add_thresholds


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ensemble",
        help="combine predictions: majority vote over CSVs or weighted mean of saved probabilities",
        description="Hard voting (--csv): a pixel belongs to a class when more than half of the CSVs "
                    "that have that class mark it (--min-votes K overrides); a CSV with fewer classes, "
                    "e.g. a palm-only CSV, votes only for its own classes. Soft voting (--probs): the "
                    "weighted mean of the probabilities written by `twostage infer --save-probs`, then "
                    "per-class thresholds. All inputs must cover the same images. Streams image by "
                    "image; the CSV is written atomically.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", nargs="+", type=Path, metavar="CSV", help="prediction CSVs to vote over (2 or more)")
    src.add_argument("--probs", nargs="+", type=Path, metavar="DIR",
                     help="folders written by `twostage infer --save-probs` to average")
    p.add_argument("--out", type=Path, required=True, metavar="OUT.csv", help="CSV to write")
    p.add_argument("--min-votes", type=int, metavar="K",
                   help="hard voting: votes a pixel needs (default: more than half of the CSVs having the class)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="soft voting: one weight per --probs folder (default equal)")
    add_thresholds(p)  # soft voting only
    p.add_argument("--images", type=Path, metavar="DATA",
                   help="soft voting: dataset or image folder whose sorted path order the CSV follows "
                        "(default: sorted by image name)")
    add_device(p)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..errors import TwostageError

    if args.csv:
        if args.weights or args.thresholds is not None or args.images:
            raise TwostageError("--weights, --thresholds and --images apply to soft voting (--probs), not --csv")
        from ..evaluation.ensemble import vote_csvs

        summary = vote_csvs(args.csv, args.out, min_votes=args.min_votes, device=args.device)
    else:
        if args.min_votes is not None:
            raise TwostageError("--min-votes applies to hard voting (--csv), not --probs")
        from ..evaluation.ensemble import average_probs

        summary = average_probs(args.probs, args.out, weights=args.weights, thresholds=args.thresholds,
                                device=args.device, images=args.images)
    print(f"wrote {summary.out}: {summary.images} images x {len(summary.classes)} classes, "
          f"{summary.mode} voting over {len(summary.inputs)} inputs, {summary.seconds:.1f} s")
    return 0
