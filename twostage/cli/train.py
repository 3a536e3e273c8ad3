"""`twostage train`: train the global or the palm stage from a stage config."""
from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the global or the palm model (stages/<stage>.yaml + overrides)",
        description=(
            "Train one stage. The config is stages/<STAGE>.yaml (global, palm, demo-global, "
            "demo-palm) or --config FILE, then --set key=value overrides, then the shortcut "
            "flags. The run folder (--out, default runs/<stage>) gets config.yaml, split.json, "
            "metrics.csv, best.pt and last.pt (every epoch). The same command under "
            "`torchrun --nproc_per_node N -m twostage train ...` trains with DDP. "
            "See every key with --help-config."
        ),
        epilog="example: twostage train --stage global --data DATA --out runs/global --set model.encoder=resnet34",
    )
    p.add_argument("--stage", metavar="NAME", help="stage config in stages/: global, palm, demo-global, demo-palm")
    p.add_argument("--config", metavar="FILE", help="a stage config YAML used instead of stages/<stage>.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.encoder=resnet34 (repeatable; YAML values)")
    p.add_argument("--data", metavar="DIR", nargs="+",
                   help="dataset root (data.root); palm: the prepare-sr output. Global: several roots train on "
                        "all of them (e.g. DATA PSEUDO; weights: --set data.source_weights=[1,0.5])")
    p.add_argument("--out", metavar="DIR", help="run folder (train.out)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="train.batch_size (per process)")
    p.add_argument("--device", help="train.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--input-size", type=int, dest="input_size", help="model.input_size (square)")
    p.add_argument("--workers", type=_workers, help="train.workers: DataLoader processes, or auto (the cores less one)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt (an error if there is none or it finished)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its description and exit")
    p.set_defaults(func=_run)


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number or auto") from None


def _run(args: argparse.Namespace) -> int:
    if args.help_config:
        from ..config import describe

        print(describe())
        return 0
    from ..train import train_stage

    run = train_stage(args.stage, args.config, args.overrides, resume=args.resume,
                      data=None if args.data is None else args.data[0] if len(args.data) == 1 else args.data,
                      out=args.out, epochs=args.epochs, batch_size=args.batch_size, device=args.device,
                      input_size=args.input_size, workers=args.workers, seed=args.seed)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, not one per process
        print(f"run folder: {run}  (best.pt, last.pt, metrics.csv)")
    return 0
