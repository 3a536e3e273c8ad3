"""`twostage train-sr DATA --out NAME`: an X-ray super-resolution network from your own radiographs."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-sr",
        help="train a super-resolution network on the palm regions of your radiographs",
        description=(
            "Trains an upscaler for prepare-sr from the training images themselves: native-resolution "
            "patches of every palm region are the targets, the same patches through Real-ESRGAN's "
            "degradation model (blur kernels, noise, resize, JPEG; basicsr's functions) the inputs. "
            "The config is stages/<STAGE>.yaml (sr: for the real data and a GPU; demo-sr: minutes on a "
            "CPU) or --config FILE, then --set overrides, then the flags. The result is written like an "
            "official Real-ESRGAN file as NAME.pth in the weights folder and registered in its "
            "trained.yaml with its sha256, the data and the held-out PSNR/SSIM against bicubic; then "
            "`twostage prepare-sr DATA --upscaler NAME` uses it. The run folder (--run, default "
            "runs/sr-NAME) holds config.yaml, metrics.csv and the resumable state.pt. "
            "See every key with --help-config."
        ),
        epilog="example: twostage train-sr DATA --out xray-x4 --stage sr --device cuda",
    )
    p.add_argument("data", nargs="?", type=Path,
                   help="dataset root (DATA/train/DCM/<ID>/*.png with DATA/train/outputs_json; its train split is used)")
    p.add_argument("--out", metavar="NAME", help="upscaler name of the result (NAME.pth in the weights folder)")
    p.add_argument("--stage", metavar="NAME", default="sr", help="sr config in stages/: sr, demo-sr (default sr)")
    p.add_argument("--config", metavar="FILE", help="an sr config YAML used instead of stages/<stage>.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set net.num_feat=64 (repeatable; YAML values)")
    p.add_argument("--steps", type=int, metavar="N", help="train.steps")
    p.add_argument("--batch-size", type=int, dest="batch_size", metavar="N", help="train.batch_size")
    p.add_argument("--device", help="train.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, metavar="N", help="train.seed")
    p.add_argument("--threads", type=int, metavar="N", help="train.threads (torch CPU threads)")
    p.add_argument("--run", metavar="DIR", help="run folder (train.out; default runs/sr-NAME)")
    p.add_argument("--init", metavar="NAME", help="start from this manifest network (net.init), e.g. "
                                                  "realesr-general-x4v3 (set net.* to its sizes)")
    p.add_argument("--weights-dir", type=Path, metavar="DIR",
                   help="weights folder the result goes to (default: $TWOSTAGE_WEIGHTS, "
                        "else weights/ of a checkout, else ~/.cache/twostage/weights)")
    p.add_argument("--resume", action="store_true", help="continue the run folder's state.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start again over an earlier run folder and replace a trained network of that name")
    p.add_argument("--help-config", action="store_true", help="list every sr config key and exit")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..errors import TwostageError
    from ..sr.quality import quality_table
    from ..sr.train_config import describe_sr, load_sr_config
    from ..sr.training import elapsed, train_sr

    if args.help_config:
        print(describe_sr())
        return 0
    if args.data is None or not args.out:
        raise TwostageError("train-sr: give the dataset and the name of the result: twostage train-sr DATA --out NAME")
    overrides = list(args.overrides) + ([f"net.init={args.init}"] if args.init else [])
    cfg = load_sr_config(None if args.config else args.stage, args.config, overrides, data=str(args.data),
                         steps=args.steps, batch_size=args.batch_size, device=args.device, seed=args.seed,
                         threads=args.threads, run=args.run)
    result = train_sr(args.out, cfg, weights_dir=args.weights_dir, resume=args.resume, overwrite=args.overwrite)
    if result.quality:
        print("held-out PSNR / SSIM (network vs bicubic):\n" + quality_table(result.quality))
    if not result.finished:
        print(f"train-sr: stopped at step {result.step}/{cfg.train.steps} after {elapsed(result.seconds)}; "
              f"continue with --resume (run folder {result.run})")
        return 0
    print(f"train-sr: {result.name} -> {result.path} (sha256 {result.sha256}) in {elapsed(result.seconds)}; "
          f"use it with `twostage prepare-sr DATA --out PALMDATA --upscaler {result.name}"
          + (f" --weights-dir {args.weights_dir}`" if args.weights_dir else "`"))
    return 0
