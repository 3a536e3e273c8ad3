"""`twostage prepare-sr DATA --out PALMDATA`: super-resolved palm crops for palm training."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..box import DEFAULT_MARGIN


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare-sr",
        help="crop, upscale and re-annotate the palm region of every training image",
        description="For each training image: the palm box from its carpal polygons (grown by "
                    "--margin), a context crop (--context x the box side) of the source image, "
                    "upscaled by --upscaler, and every polygon mapped into the crop. Writes "
                    "PALMDATA/train/{DCM,outputs_json} (the usual layout), one manifest per item "
                    "and PALMDATA/palmset.json (the record palm training and inference check). "
                    "Resumable: re-running skips finished items. Images without carpal "
                    "annotations are skipped with a warning.",
    )
    p.add_argument("data", type=Path, help="dataset root (its train/ split is used)")
    p.add_argument("--out", type=Path, required=True, metavar="PALMDATA", help="output folder")
    p.add_argument("--upscaler", default="bicubic",
                   help="bicubic (no weights), a weights-manifest name (RealESRGAN_x4plus, "
                        "RealESRGAN_x2plus, realesr-general-x4v3) or a network `twostage train-sr` trained "
                        "(default: bicubic)")
    p.add_argument("--scale", type=int, help="upscaling factor (bicubic: any integer, default 4; "
                                             "networks: their own)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="box margin: fraction of the carpal extent added on each side (default %(default)s)")
    p.add_argument("--context", type=float, default=1.5,
                   help="crop side / box side, room for box jitter in training (default 1.5)")
    p.add_argument("--tile", type=int, default=0, help="Real-ESRGAN tile size, 0 = whole crop (default 0)")
    p.add_argument("--device", default="cpu", help="torch device for the network, e.g. cuda (default cpu)")
    p.add_argument("--shard", default="0/1", metavar="i/n",
                   help="process the i-th of n contiguous slices of the items (i is 0-based); run n of "
                        "these in parallel (default 0/1)")
    p.add_argument("--input-size", type=int, metavar="N",
                   help="the palm network's input side these crops are for, only to warn when it is "
                        "below the native palm box side (default: model.input_size of --stage)")
    p.add_argument("--stage", default="palm",
                   help="palm stage config whose model.input_size is checked (default: palm)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow replacing a palm set made with other settings in PALMDATA")
    p.add_argument("--fixes", type=Path, help="label fixes YAML applied on read")
    p.add_argument("--weights-dir", type=Path, help="weights folder (default: $TWOSTAGE_WEIGHTS, else weights/ of a checkout, "
                        "else ~/.cache/twostage/weights)")
    p.add_argument("--trust-unpinned", action="store_true",
                   help="accept a weight file whose sha256 is not pinned (see `twostage weights`)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..sr.prepare import prepare_sr

    palm_input = args.input_size if args.input_size is not None else load_config(stage=args.stage).model.input_size
    counts = prepare_sr(args.data, args.out, upscaler=args.upscaler, scale=args.scale, margin=args.margin,
                        context=args.context, tile=args.tile, device=args.device, shard=args.shard,
                        overwrite=args.overwrite, fixes=args.fixes, weights_dir=args.weights_dir,
                        trust_unpinned=args.trust_unpinned, palm_input=palm_input)
    print(f"prepare-sr: {counts['done']} written, {counts['skipped']} already done, "
          f"{counts['no_carpals']} skipped (no carpals), {counts['dropped']} dropped by fixes -> {args.out}")
    return 0
