"""`twostage check DATA`: validate a dataset (layout, PNGs, JSON, labels, sizes) in one report."""
from __future__ import annotations

import argparse
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    """Expected size as (H, W): '2048' is square, '2048x1536' is width x height."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a side like 2048 or WxH like 2048x1536") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a side like 2048 or WxH like 2048x1536")
    return parts[1], parts[0]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="validate a dataset before training",
        description="Check a dataset in the DATA/{train,test}/DCM + train/outputs_json layout: "
                    "missing/orphan files, corrupt PNGs, invalid JSON, unknown labels, short "
                    "polygons, points outside the image, duplicate or missing classes, image "
                    "sizes and bit depths. Exit code 1 only when the data is unusable "
                    "(no images, corrupt PNG, invalid JSON); warnings are listed with counts.",
    )
    p.add_argument("data", type=Path, help="dataset root (holding train/ and/or test/), or one split folder")
    p.add_argument("--fixes", type=Path, help="label fixes YAML applied before the label checks")
    p.add_argument("--size", type=_size, metavar="N|WxH",
                   help="expected image size (e.g. 2048); default: report sizes that differ from the most common")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..data.check import check_dataset
    from ..io.files import write_json_atomic

    report = check_dataset(args.data, fixes=args.fixes, expected_size=args.size)
    print(report.text())
    if args.json:
        write_json_atomic(args.json, report.to_dict())
    return 0 if report.ok else 1

