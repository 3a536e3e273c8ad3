"""`twostage` console script: argparse subcommands, one small module per command.

Each module in COMMANDS has `register(subparsers)` adding its parser with
`set_defaults(func=handler)`; a handler turns arguments into one library call. A
TwostageError is printed on one line (exit 2); `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import TwostageError

# Order is the order shown in `twostage --help`.
COMMANDS = [
    "demo", "synth", "check", "train_sr", "prepare_sr", "weights", "train", "infer",
    "score", "evaluate", "ensemble", "visualize", "calibrate", "pseudo_label", "export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twostage",
        description="Hand-bone X-ray segmentation with a super-resolved palm specialist.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except TwostageError as e:
        if args.debug:
            raise
        # One line even when the message quotes a multi-line parser error (YAML, unpickler).
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `twostage ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
