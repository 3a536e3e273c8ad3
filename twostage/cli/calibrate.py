"""`twostage calibrate DATA --global CKPT --palm CKPT --out DIR`: per-class fusion weights and thresholds."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..calibrate import THRESHOLD_GRID, WEIGHT_GRID

    p = subparsers.add_parser(
        "calibrate",
        help="choose per-class fusion weights and thresholds on annotated validation images",
        description="Run the global and palm models once per annotated image of DATA and, for every class, "
                    "pick the fusion weight a_c (palm classes) and threshold t_c from the grids that maximise "
                    "mean Dice. The defaults (a=0.7, threshold 0.5) are always in the grid, so the result is "
                    "never worse than them on DATA. Writes DIR/fuse_weights.yaml and DIR/thresholds.yaml for "
                    "`twostage infer --fuse-weights ... --thresholds ...`, and DIR/calibration.json. "
                    "Calibrate on images the models were not trained on.",
    )
    p.add_argument("data", type=Path, metavar="DATA", help="annotated validation data: dataset root or split folder")
    p.add_argument("--global", dest="global_ckpt", type=Path, required=True, metavar="CKPT",
                   help="global-stage checkpoint or run folder")
    p.add_argument("--palm", dest="palm_ckpt", type=Path, required=True, metavar="CKPT",
                   help="palm-stage checkpoint or run folder")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the YAML files")
    p.add_argument("--grid", default=",".join(f"{v:g}" for v in WEIGHT_GRID), metavar="A,B,...|START:STOP:STEP",
                   help="fusion weights to try (default 0,0.1,...,1)")
    p.add_argument("--thresholds-grid", default=",".join(f"{v:g}" for v in THRESHOLD_GRID),
                   metavar="A,B,...|START:STOP:STEP", help="thresholds to try (default 0.05:0.95:0.05)")
    p.add_argument("--image", nargs="+", metavar="NAME", help="only these images (file names or stems)")
    p.add_argument("--split", choices=("train", "test"), help="split of a dataset root (default: train)")
    p.add_argument("--fixes", type=Path, metavar="FIXES.yaml", help="label fixes applied to the ground truth")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--tta", choices=("hflip",), help="test-time augmentation, as the infer run will use")
    p.add_argument("--feather", type=float, default=None, metavar="F",
                   help="feather ramp as a fraction of the box side, as the infer run will use (default 0.1)")
    p.add_argument("--palm-resize", choices=("bilinear", "area"), default="bilinear",
                   help="palm probabilities to the box size, as the infer run will use")
    p.add_argument("--weights-dir", type=Path, metavar="DIR", help="folder holding the upscaler weight files")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the result as JSON here")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..calibrate import calibrate, parse_grid
    from ..fusion import DEFAULT_FEATHER
    from ..io import write_json_atomic

    result = calibrate(
        args.data, args.global_ckpt, args.palm_ckpt, args.out,
        weight_grid=parse_grid(args.grid, "grid"), threshold_grid=parse_grid(args.thresholds_grid, "thresholds-grid"),
        split=args.split, fixes=args.fixes, images=args.image, device=args.device, tta=args.tta,
        feather=DEFAULT_FEATHER if args.feather is None else args.feather, palm_resize=args.palm_resize,
        weights_dir=args.weights_dir,
    )
    print(result.table())
    print(f"wrote {', '.join(result.files)} ({result.seconds:.1f} s)")
    if args.json:
        write_json_atomic(args.json, result.to_dict())
    return 0
