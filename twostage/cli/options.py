"""The command-line form of `chain.ChainOptions`, shared by every command that runs the
networks (infer, evaluate, calibrate, visualize) and, for --device and --thresholds, by
ensemble: an option defined here reaches all of them the same way. Also the --classes parser
of score and visualize."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..classes import CLASSES, PALM_CLASSES

THRESHOLDS_HELP = ("per-class probability thresholds: one number, or a YAML mapping class: threshold "
                   "(optional 'default:'; may sit under a 'thresholds:' key, e.g. thresholds.yaml from "
                   "`twostage calibrate`). Default 0.5")


def parse_classes(text: str) -> tuple[str, ...]:
    """'palm', 'all' or a comma-separated list of class names."""
    if text == "palm":
        return PALM_CLASSES
    if text == "all":
        return CLASSES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CLASSES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown class name(s) {unknown or [text]}; use 'palm', 'all' "
                                         f"or names from: {', '.join(CLASSES)}")
    return names


def add_checkpoints(p: argparse.ArgumentParser, palm_help: str = "palm-stage checkpoint or run folder",
                    palm_required: bool = True, exported: bool = False) -> None:
    """--global CKPT (required) and --palm CKPT, as `args.global_ckpt` and `args.palm_ckpt`;
    `exported`: --global or --exported DIR (a `twostage export` folder, `args.exported`)."""
    source = p.add_mutually_exclusive_group(required=True) if exported else p
    if exported:
        source.add_argument("--exported", type=Path, metavar="DIR",
                            help="a `twostage export` folder (the whole chain; with --backend onnxruntime)")
    source.add_argument("--global", dest="global_ckpt", type=Path, required=not exported, metavar="CKPT",
                        help="global-stage checkpoint (best.pt) or its run folder")
    p.add_argument("--palm", dest="palm_ckpt", type=Path, required=palm_required, metavar="CKPT", help=palm_help)


def add_prediction_source(p: argparse.ArgumentParser, csv_help: str, palm_help: str) -> None:
    """--csv PRED.csv or --global CKPT (one of them required), then --palm CKPT and --fuse, as
    `args.csv`, `args.global_ckpt`, `args.palm_ckpt`, `args.fuse`: a command that reads
    predictions from a CSV or makes them with checkpoints (visualize, pseudo-label)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, metavar="PRED.csv", help=csv_help)
    src.add_argument("--global", dest="global_ckpt", type=Path, metavar="CKPT",
                     help="predict with this global checkpoint (or run folder)")
    p.add_argument("--palm", dest="palm_ckpt", type=Path, metavar="CKPT", help=palm_help)
    p.add_argument("--fuse", action="store_true", help="fuse the palm model into the global prediction (needs --palm)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default: cpu)")


def add_thresholds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--thresholds", default=None, metavar="T|FILE.yaml", help=THRESHOLDS_HELP)


def add_chain_options(p: argparse.ArgumentParser, per_class: bool = True, runtime: bool = True) -> None:
    """Every ChainOptions field as a flag. `per_class=False` leaves out --thresholds and
    --fuse-weights (calibrate chooses them); `runtime=False` leaves out --device, --fp16,
    --compile and --accumulate (export records the chain, not where it runs)."""
    if runtime:
        add_device(p)
        p.add_argument("--fp16", action="store_true",
                       help="float16 for the segmentation networks (autocast, channels-last; CUDA only, an error "
                            "on CPU). A Real-ESRGAN upscaler always runs in float16 on CUDA")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile both networks: compiling takes minutes before the first image, so it "
                            "pays only on many images of one size (opt-in)")
    p.add_argument("--tta", choices=("hflip",), help="test-time augmentation: average with the horizontal flip")
    p.add_argument("--scales", default=None, metavar="S1,S2,...",
                   help="multi-scale TTA: average the probabilities of the image at these scales, e.g. "
                        "0.75,1.0,1.25 (both networks; combines with --tta). Default 1.0")
    p.add_argument("--overlap", type=float, default=None, metavar="F",
                   help="sliding-window overlap of patch-trained checkpoints, 0 to <1 (default 0.5)")
    if runtime:
        p.add_argument("--accumulate", default="device", metavar="device|cpu",
                       help="where sliding-window outputs are accumulated: the compute device (default) or "
                            "the CPU, for images whose probabilities do not fit the GPU")
    if per_class:
        p.add_argument("--calibration", default="auto", metavar="DIR|none",
                       help="fusion weights and thresholds from `twostage calibrate`: 'auto' (default) uses "
                            "<palm run>/calibration when it was made for these two checkpoints; 'none' the "
                            "defaults; or a folder. --thresholds / --fuse-weights override it")
        add_thresholds(p)
        p.add_argument("--fuse-weights", default=None, metavar="A|FILE.yaml",
                       help="per-class fusion weights a_c for the palm classes (YAML mapping class: weight, "
                            "optional 'default:', may sit under 'fuse_weights:'), or one number. Default 0.7")
    p.add_argument("--feather", type=float, default=None, metavar="F",
                   help="feather ramp width as a fraction of the box side (default 0.1; 0 = hard edge)")
    p.add_argument("--palm-resize", choices=("bilinear", "area"), default="bilinear",
                   help="how palm probabilities are resized to the box size (default bilinear)")
    p.add_argument("--tile", type=int, default=0, metavar="PX",
                   help="upscaler tile size in pixels (0 = whole crop; tiling saves memory, same result)")
    p.add_argument("--weights-dir", type=Path, metavar="DIR", help="folder holding the upscaler weight files")


def chain_options(args: argparse.Namespace) -> dict:
    """The ChainOptions keywords of parsed `add_chain_options` flags."""
    from ..fusion import DEFAULT_FEATHER
    from ..window import DEFAULT_OVERLAP

    options = {"tta": args.tta, "feather": DEFAULT_FEATHER if args.feather is None else args.feather,
               "palm_resize": args.palm_resize, "upscaler_tile": args.tile, "weights_dir": args.weights_dir,
               "scales": args.scales if args.scales is not None else (1.0,),
               "overlap": DEFAULT_OVERLAP if args.overlap is None else args.overlap}
    if hasattr(args, "accumulate"):
        options.update(device=args.device, fp16=args.fp16, accumulate=args.accumulate, compile=args.compile)
    if hasattr(args, "fuse_weights"):
        options.update(thresholds=args.thresholds, fuse_weights=args.fuse_weights, calibration=args.calibration)
    return options
