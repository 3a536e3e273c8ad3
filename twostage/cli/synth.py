"""`twostage synth`: write a procedural hand-radiograph phantom dataset (docs/DESIGN.md §1 layout)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..data.synth import VARIANTS

    variants = "; ".join(f"{name} ({', '.join(f'{k}={v}' for k, v in style.changes().items()) or 'as always'})"
                         for name, style in VARIANTS.items())
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic hand X-ray dataset (the embedded demo/test data)",
        description=(
            "Write a procedural hand-radiograph phantom in the dataset layout the other "
            "commands read: OUT/train/DCM/IDxxx/image<13 digits>_{L,R}.png with "
            "OUT/train/outputs_json/... polygon JSON (29 bones), OUT/test/DCM/... without "
            "JSON, and OUT/meta_data.csv. Two images (left and right hand) per ID; an odd "
            "count gives the last ID a single right hand. The same arguments always give "
            "byte-identical files."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset folder (must be empty or absent)")
    p.add_argument("--n", type=int, default=20, help="number of training images, with JSON (default: %(default)s)")
    p.add_argument("--test-n", type=int, default=0, dest="test_n", help="number of test images, no JSON (default: %(default)s)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels, square images, >= 64 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--variant", default="default", metavar="NAME",
                   help=f"phantom style (twostage.data.synth.VARIANTS): {variants} (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already has files")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..data.synth import synthesize

    out = synthesize(args.out, n=args.n, size=args.size, seed=args.seed, test_n=args.test_n,
                     overwrite=args.overwrite, style=args.variant)
    print(f"wrote {args.n} train + {args.test_n} test images ({args.size} px, variant {args.variant}) to {out}")
    return 0
