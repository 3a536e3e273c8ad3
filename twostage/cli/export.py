"""`twostage export --global CKPT [--palm CKPT] --out DIR [--fp16] [--opset N]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_chain_options, add_checkpoints, chain_options


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..inference.export import DEFAULT_OPSET

    p = subparsers.add_parser(
        "export",
        help="write the trained chain as ONNX files plus chain.yaml, for ONNX Runtime or an inference server",
        description="Export the global network, the palm network and the upscaler recorded in the palm "
                    "checkpoint (Real-ESRGAN/compact; bicubic has no network) as ONNX files with dynamic "
                    "batch, height and width where the architecture allows (else fixed to the size the chain "
                    "runs them at; chain.yaml says why), each checked against PyTorch with ONNX Runtime, and "
                    "chain.yaml with everything else the chain needs: classes, input sizes, normalisation, "
                    "box rule, upscaler scale and tiling, fusion weights and thresholds (the calibration when "
                    "there is one), feather, palm resize, sliding-window settings, the sha256 of every file. "
                    "The inference options below are recorded. DIR must be new or empty; it appears complete "
                    "or not at all. Run it with `twostage infer IMAGES --exported DIR --backend onnxruntime`.",
    )
    add_checkpoints(p, "palm-stage checkpoint or run folder (leave out for a global-only export)",
                    palm_required=False)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--fp16", action="store_true",
                   help="float16 networks (float32 inputs and outputs kept; for GPUs: slow on CPUs)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset (default {DEFAULT_OPSET}; a fixed-size fallback through torch.export uses >= 18)")
    add_chain_options(p, runtime=False)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..inference.export import export

    summary = export(args.global_ckpt, args.out, palm_ckpt=args.palm_ckpt, fp16=args.fp16, opset=args.opset,
                     **chain_options(args))
    for name, record in summary.networks.items():
        shape = "dynamic batch/height/width" if record["dynamic"]["height"] else \
            f"dynamic batch, fixed {record['fixed_size'][1]}x{record['fixed_size'][0]}"
        print(f"{name}.onnx: {shape}, {record['method']} opset {record['opset']}, "
              f"largest difference from PyTorch {record['max_difference']:.2g}")
    print(f"wrote {summary.out} ({len(summary.files)} ONNX file(s) + chain.yaml)")
    return 0
