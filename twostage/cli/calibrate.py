"""`twostage calibrate DATA --global CKPT --palm CKPT --out DIR`: per-class fusion weights and thresholds."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_chain_options, add_checkpoints, chain_options


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..evaluation.calibrate import THRESHOLD_GRID, WEIGHT_GRID

    p = subparsers.add_parser(
        "calibrate",
        help="choose per-class fusion weights and thresholds on annotated validation images",
        description="Run the global and palm models once per annotated image of DATA whose ID neither model "
                    "trained on (on the training dataset: the validation fold) and, for every class, pick the "
                    "fusion weight a_c (palm classes; 0 = the global model alone) and threshold t_c from the "
                    "grids that maximise mean Dice. The defaults (a=0.7, threshold 0.5) are always in the "
                    "grid, so the result is never worse than them on those images. Writes "
                    "DIR/calibration.json (default DIR: <palm run>/calibration, where `twostage infer --fuse`, "
                    "evaluate and visualize find it and use it for this checkpoint pair), and "
                    "DIR/fuse_weights.yaml, DIR/thresholds.yaml for --fuse-weights / --thresholds.",
    )
    p.add_argument("data", type=Path, metavar="DATA", help="annotated validation data: dataset root or split folder")
    add_checkpoints(p)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="folder for the files (default: <palm run>/calibration, used by infer --fuse)")
    p.add_argument("--min-gain", type=float, default=0.0, metavar="D",
                   help="a class keeps the defaults unless another pair gains more than D mean Dice on the "
                        "calibration images (default 0)")
    p.add_argument("--all-images", action="store_true",
                   help="use every image of DATA, also those whose ID a model trained on (default: only "
                        "IDs neither model trained on, as recorded in the checkpoints)")
    p.add_argument("--grid", default=",".join(f"{v:g}" for v in WEIGHT_GRID), metavar="A,B,...|START:STOP:STEP",
                   help="fusion weights to try (default 0,0.1,...,1)")
    p.add_argument("--thresholds-grid", default=",".join(f"{v:g}" for v in THRESHOLD_GRID),
                   metavar="A,B,...|START:STOP:STEP", help="thresholds to try (default 0.05:0.95:0.05)")
    p.add_argument("--image", nargs="+", metavar="NAME", help="only these images (file names or stems)")
    p.add_argument("--split", choices=("train", "test"), help="split of a dataset root (default: train)")
    p.add_argument("--fixes", type=Path, metavar="FIXES.yaml", help="label fixes applied to the ground truth")
    add_chain_options(p, per_class=False)
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the result as JSON here")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..evaluation.calibrate import calibrate, parse_grid
    from ..io.files import write_json_atomic

    result = calibrate(
        args.data, args.global_ckpt, args.palm_ckpt, args.out,
        weight_grid=parse_grid(args.grid, "grid"), threshold_grid=parse_grid(args.thresholds_grid, "thresholds-grid"),
        split=args.split, fixes=args.fixes, images=args.image, holdout=not args.all_images, min_gain=args.min_gain,
        **chain_options(args),
    )
    print(result.table())
    print(f"wrote {', '.join(result.files)} ({result.seconds:.1f} s)")
    if args.json:
        write_json_atomic(args.json, result.to_dict())
    return 0
