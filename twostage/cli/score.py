"""`twostage score PRED.csv --gt DATA`: Dice per class, carpal mean and overall of a prediction CSV."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import parse_classes


def _bins(text: str) -> list[float] | int:
    """'20,40,60' (bin edges) or '4' (number of quantile bins)."""
    try:
        if "," not in text:
            return int(text)
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bin edges like 20,40,60 or a bin count like 4") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score a prediction CSV against annotated images",
        description="Score a prediction CSV (header image_name,class,rle) against the annotated "
                    "images of a dataset: Dice = (2|A∩B| + 1e-4) / (|A| + |B| + 1e-4) per image "
                    "and class, averaged over images; prints the per-class table, the carpal mean "
                    "and the overall mean. A CSV missing ground-truth images or classes is an "
                    "error; rows for images without ground truth are reported and ignored.",
    )
    p.add_argument("pred", type=Path, metavar="PRED.csv", help="prediction CSV (e.g. from `twostage infer`)")
    p.add_argument("--gt", type=Path, required=True, metavar="DATA",
                   help="ground truth: dataset root (uses train/) or a split folder with DCM/ and outputs_json/")
    p.add_argument("--fixes", type=Path, metavar="FIXES.yaml", help="label fixes applied to the ground truth")
    p.add_argument("--classes", type=parse_classes, default=None, metavar="NAMES",
                   help="classes to score: 'all' (default), 'palm' (the 8 carpals, e.g. for a palm-only "
                        "CSV) or a comma-separated list")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the report (with per-image Dice) as JSON")
    p.add_argument("--by", metavar="COLUMN",
                   help="also break the Dice down by a column of DATA's meta_data table (e.g. sex, age)")
    p.add_argument("--bins", type=_bins, metavar="E1,E2,...|N",
                   help="with --by on a numeric column: bin edges (e.g. 20,40,60) or a number of quantile bins")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..evaluation.score import score_csv
    from ..io.files import write_json_atomic

    report = score_csv(args.pred, args.gt, fixes=args.fixes, classes=args.classes)
    print(report.table())
    result = report.to_dict()
    if args.by:
        from ..evaluation.score import breakdown_table, metadata_breakdown

        groups = metadata_breakdown(report, args.gt, args.by, args.bins)
        print()
        print(breakdown_table(groups, args.by))
        result["by"] = {"column": args.by, "groups": {g: {"n_images": r.n_images, "carpal_mean": r.carpal_mean,
                                                          "overall": r.overall} for g, r in groups.items()}}
    if args.json:
        write_json_atomic(args.json, result)
    return 0
