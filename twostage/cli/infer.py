"""`twostage infer IMAGES --global CKPT [--palm CKPT --fuse] --out submission.csv`, or
`twostage infer IMAGES --exported DIR --backend onnxruntime --out submission.csv`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_chain_options, add_checkpoints, chain_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer",
        help="segment images into a submission CSV of RLE masks (image_name,class,rle; global model, "
             "optionally fused with the palm model)",
        description="Run the global model on every PNG under IMAGES and write the submission CSV "
                    "(image_name,class,rle; 29 rows per image, images in sorted path order). With "
                    "--fuse, the palm box is derived from the global carpal prediction, the source "
                    "crop is upscaled with the upscaler recorded in the palm checkpoint, the palm "
                    "model re-segments it and its probabilities are blended into the global ones "
                    "inside the box: p = (1 - a_c*w)*p_global + a_c*w*p_palm. The CSV is written "
                    "atomically: an unreadable image stops the run and leaves no CSV unless "
                    "--skip-bad. A second infer into the same CSV while this one runs is refused.",
    )
    p.add_argument("images", type=Path, metavar="IMAGES",
                   help="a folder of PNGs (recursive) or a dataset root (uses test/DCM, else train/DCM)")
    add_checkpoints(p, "palm-stage checkpoint or run folder (used with --fuse)", palm_required=False,
                    exported=True)
    p.add_argument("--backend", choices=("pytorch", "onnxruntime"),
                   help="what runs the networks: pytorch (checkpoints; the default) or onnxruntime (--exported "
                        "DIR; --device cuda uses its CUDA provider where installed)")
    p.add_argument("--fuse", action="store_true", help="fuse the palm model into the global prediction (needs --palm)")
    p.add_argument("--out", type=Path, required=True, metavar="CSV", help="CSV to write, e.g. submission.csv")
    p.add_argument("--split", choices=("train", "test"), help="which split of a dataset root to read (default: test, else train)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per global forward pass (default: 1)")
    add_chain_options(p)
    p.add_argument("--save-probs", type=Path, metavar="DIR",
                   help="also write per-image uint8-quantised probabilities DIR/<image>.npz for ensembling")
    p.add_argument("--shard", default="0/1", metavar="i/n",
                   help="process the i-th of n contiguous slices of the sorted images (default 0/1)")
    p.add_argument("--skip-bad", action="store_true",
                   help="write empty masks for images that are unreadable or fail inside the chain (e.g. out "
                        "of memory on one image; listed at the end) instead of stopping")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..inference.infer import infer

    summary = infer(args.images, args.global_ckpt, args.out, palm_ckpt=args.palm_ckpt, fuse=args.fuse,
                    exported=args.exported, backend=args.backend,
                    batch_size=args.batch_size, save_probs=args.save_probs, shard=args.shard,
                    skip_bad=args.skip_bad, split=args.split, **chain_options(args))
    mode = "global + palm (fused)" if summary.fused else "global only"
    print(f"wrote {summary.out}: {summary.images} images x 29 classes, {mode}, "
          f"{summary.seconds:.1f} s on {summary.device} (+ {summary.setup_s:.1f} s to build the chain)")
    if summary.skipped:
        print(f"{len(summary.skipped)} image(s) unreadable or failing in the chain, written as empty masks:")
        for path in summary.skipped:
            print(f"  {path}")
    return 0
