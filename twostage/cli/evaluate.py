"""`twostage evaluate DATA --global CKPT --palm CKPT`: global-only vs fused on data with GT."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_chain_options, add_checkpoints, chain_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="compare global-only and fused predictions on annotated data",
        description="Run inference twice on annotated images (the global model alone, then fused with the "
                    "palm model), score both and write OUT/table.txt, OUT/evaluation.json, "
                    "OUT/dice_per_class.png (the change in Dice per class against the global model) and "
                    "comparison pictures (ground truth / prediction / overlap, palm box drawn) under OUT/pictures.",
    )
    p.add_argument("data", type=Path, metavar="DATA", help="dataset root or split folder with DCM/ and outputs_json/")
    add_checkpoints(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--fixes", type=Path, metavar="FIXES.yaml", help="label fixes applied to the ground truth")
    p.add_argument("--pictures", type=int, default=3, help="number of images to draw (default: %(default)s)")
    p.add_argument("--split", choices=("train", "test"), help="split of DATA to use (default: train if present)")
    add_chain_options(p)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate

    ev = evaluate(args.data, args.global_ckpt, args.palm_ckpt, args.out, pictures=args.pictures, fixes=args.fixes,
                  split=args.split, **chain_options(args))
    print(ev.table())
    print(f"\ncarpal gain {ev.carpal_gain:+.4f}, overall gain {ev.overall_gain:+.4f}")
    print("written:\n" + "\n".join(f"  {p}" for p in ev.files.values()))
    return 0
