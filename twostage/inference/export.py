"""`twostage export`: a trained chain as ONNX files plus `chain.yaml` (docs/DESIGN.md §3
"Export", docs/deploying.md); `onnx_backend` reads such a folder back and verifies it
(`read_exported`) before anything runs it.

The networks (global, palm, the recorded Real-ESRGAN upscaler; bicubic has none) are written
as they run inside `Predictor` and `sr.Upscaler`: normalised float32 (B, C, H, W) in, logits
(or the upscaled RGB image) out. Everything around them (resize, normalisation, box rule,
crop, fusion, thresholds, sliding windows) is data in chain.yaml, read back by
`onnx_backend.exported_chain` into the same `chain.TwoStage`, so there is one implementation
of each rule whichever runtime computes the networks.

Each network is traced with dynamic batch, height and width, checked against PyTorch with
ONNX Runtime at the example size and at another one; where the graph cannot follow another
size (UPerNet's adaptive pooling: ONNX has no adaptive pool, the exporter bakes the example's
pooling windows in), it is written for the fixed input size it runs at and chain.yaml says
why. Nothing is written under OUT unless every file exported and agreed (`io.files.staging_dir`).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..classes import CLASSES
from ..errors import TwostageError
from ..io.files import check_new_dir, sha256_file, staging_dir, write_text_atomic
from ..io.native import native_messages
from .onnx_backend import CHAIN_FILE, FORMAT, OnnxNet

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
"""Opset of the TorchScript exporter (17: LayerNormalization; what ONNX Runtime >= 1.14 runs)."""

MIN_OPSET, MAX_OPSET = 13, 21

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
"""Largest difference (probability, or upscaled pixel in [0, 1]) between ONNX Runtime and the
PyTorch network in float32 at export; above it the attempt is not used."""

ATTEMPTS = (("torchscript", True), ("torchscript", False), ("dynamo", False))
"""(exporter, dynamic height/width) tried in order. The TorchScript exporter is fast and keeps
shapes symbolic; torch.export (dynamo, needs onnxscript) decomposes what it cannot (adaptive
pooling with windows that do not divide the feature map), at a fixed size."""


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". Please")[0][:300]


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise TwostageError(f"{module} is not installed: pip install 'twostage[onnx]'") from None


class _Float16(nn.Module):
    """A network computed in float16 between a float32 input and output: `--fp16` files keep
    the float32 interface, so the chain feeds them as it feeds the float32 ones."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(net).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.half()).float()


def _write_onnx(module: nn.Module, example: torch.Tensor, path: Path, method: str, dynamic: bool, opset: int) -> None:
    """One export attempt; the exporters' warnings and progress lines are not the user's business,
    nor is the whole graph the TorchScript exporter writes to fd 1 when it fails (its log switch
    is always on in torch 2.14)."""
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), native_messages(re.compile(""), fd=1):
        warnings.simplefilter("ignore")
        if method == "torchscript":
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": axes, "output": axes})
            return
        _require("onnxscript")
        dims = {i: torch.export.Dim(name) for i, name in axes.items()}
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=max(opset, 18),
                                    input_names=["input"], output_names=["output"],
                                    dynamic_shapes=({**dims},), verbose=False)
        program.save(str(path))


def _max_difference(module: nn.Module, path: Path, shapes: list[tuple[int, ...]],
                    activation: Callable[[torch.Tensor], torch.Tensor], sample: Callable) -> float:
    """Largest |ONNX Runtime − PyTorch| of `activation(output)` over inputs of `shapes`."""
    net = OnnxNet(path, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in shapes:
        x = sample(shape, g)
        with torch.no_grad():
            want = activation(module(x).float())
        got = activation(net(x))
        if got.shape != want.shape:
            return float("inf")
        worst = max(worst, float((got - want).abs().max()))
    return worst


def _other_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A second input shape for the check: another batch and a height/width off the stride."""
    b, c, h, w = shape
    return (1 if b > 1 else 2, c, max(16, h * 3 // 4 + 6), max(16, w * 3 // 4 + 10))


def export_network(net: nn.Module, name: str, shape: tuple[int, ...], path: Path, *, fp16: bool, opset: int,
                   allow_fixed: bool, fixed_reason: str, activation=torch.sigmoid, sample=None) -> dict:
    """Write `net` as ONNX at `path` by the first of ATTEMPTS that ONNX Runtime agrees with.

    Args:
        shape: the example input (B, C, H, W): the size the network runs at in the chain.
        allow_fixed: whether a file fixed to that H, W is acceptable (`fixed_reason` says when not).
        activation: applied to both outputs before comparing (sigmoid: probabilities).
        sample: (shape, generator) -> input (default standard normal: a normalised image).
    Returns:
        chain.yaml's record of the network: method, dynamic axes, largest difference.
    """
    sample = sample or (lambda s, g: torch.randn(s, generator=g))
    module = (_Float16(net) if fp16 else net).eval()
    precision = "fp16" if fp16 else "fp32"
    reasons = []
    for method, dynamic in ATTEMPTS:
        if not dynamic and not allow_fixed:
            reasons.append(f"{method} at a fixed size: not usable ({fixed_reason})")
            continue
        example = sample(shape, torch.Generator().manual_seed(1))
        try:
            _write_onnx(module, example, path, method, dynamic, opset)
        except Exception as e:  # noqa: BLE001 - the exporters raise many types (onnxscript missing too); each is a reason
            reasons.append(f"{method}{' (dynamic height/width)' if dynamic else ''}: {_first_line(e)}")
            continue
        other = _other_shape(shape) if dynamic else (1, *shape[1:])
        diff = _max_difference(net, path, [shape, other], activation, sample)  # float16 files too: against float32
        if diff <= TOLERANCE[precision]:
            record = {"method": method, "opset": opset if method == "torchscript" else max(opset, 18),
                      "dynamic": {"batch": True, "height": dynamic, "width": dynamic},
                      "checked_shapes": [list(shape), list(other)], "max_difference": float(f"{diff:.3g}")}
            if not dynamic:
                record["fixed_size"] = list(shape[2:])
                record["why_fixed"] = "; ".join(reasons)
                log.warning("%s: exported for %dx%d inputs only (%s)", name, shape[3], shape[2], record["why_fixed"])
            return record
        reasons.append(f"{method}{' (dynamic height/width)' if dynamic else ''}: ONNX Runtime differs from "
                       f"PyTorch by {diff:.3g} (tolerance {TOLERANCE[precision]})")
    raise TwostageError(f"{name}: cannot be exported to ONNX: {'; '.join(reasons)}")


@dataclass
class ExportSummary:
    """What `export` wrote: the folder, each file's sha256 and each network's export record."""

    out: str
    files: dict[str, str] = field(default_factory=dict)
    networks: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _f32(v: float) -> float:
    """A float32 value as the shortest decimal that reads back to it (0.7, not 0.699999988)."""
    return float(str(np.float32(v)))


def _network_meta(predictor, file: str, record: dict, source: str | os.PathLike) -> dict:
    """chain.yaml's section of a segmentation network: what `Predictor` needs to feed it."""
    from ..checkpoint import checkpoint_file

    m, ckpt = predictor.meta["model"], checkpoint_file(source)
    return {"file": file, "source": {"checkpoint": str(ckpt), "sha256": sha256_file(ckpt), "arch": m["arch"],
                                     "encoder": m["encoder"]},
            "classes": list(predictor.classes), "input_size": list(predictor.input_size),
            "in_channels": predictor.in_channels,
            "normalization": {"mean": list(predictor.mean), "std": list(predictor.std)},
            "window": predictor.window.to_dict() if predictor.window is not None else None,
            "io": {"input": "(B, in_channels, H, W) float32: the grey image resized (bilinear, antialiased when "
                            "shrinking) to input_size (or the window grid), /255, (x - mean) / std, repeated over "
                            "in_channels", "output": "(B, classes, H, W) float32 logits; probabilities = sigmoid"},
            "export": record}


def export(global_ckpt: str | os.PathLike, out: str | os.PathLike, *, palm_ckpt: str | os.PathLike | None = None,
           fp16: bool = False, opset: int = DEFAULT_OPSET, **options) -> ExportSummary:
    """Export the chain of a global (and optionally a palm) checkpoint into the new folder `out`.

    Args:
        fp16: float16 networks (float32 inputs and outputs kept).
        opset: ONNX opset of the TorchScript exporter (torch.export uses at least 18).
        **options: `chain.ChainOptions` fields that define the chain (thresholds, fuse_weights,
            calibration, feather, palm_resize, tta, scales, overlap, upscaler_tile, weights_dir);
            they are resolved (calibration applied) and written into chain.yaml.
    """
    from .. import __version__
    from ..box import extent_rule
    from ..window import SIGMA_SCALE, WINDOW_BATCH
    from .chain import ChainOptions, TwoStage

    _require("onnx")
    _require("onnxruntime")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise TwostageError(f"--opset {opset}: use {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    out = Path(out)
    check_new_dir(out)
    opts = ChainOptions(**{**options, "device": "cpu", "fp16": False})
    chain = TwoStage.load(global_ckpt, palm_ckpt, opts)
    multiscale = opts.scales != (1.0,)
    why = f"--scales {','.join(map(str, opts.scales))} needs other input sizes"
    summary = ExportSummary(out=str(out))

    def network(predictor, name: str, tmp: Path) -> dict:
        size = predictor.window.size if predictor.window is not None else predictor.input_size
        record = export_network(predictor.model, name, (2, predictor.in_channels, *size), tmp / f"{name}.onnx",
                                fp16=fp16, opset=opset, allow_fixed=not multiscale, fixed_reason=why)
        summary.networks[name] = record
        return record

    with staging_dir(out) as tmp:
        spec: dict = {"format": FORMAT, "classes": list(CLASSES), "precision": "fp16" if fp16 else "fp32",
                      "made_by": {"twostage": __version__, "torch": str(torch.__version__), "onnx": _version("onnx"),
                                  "onnxruntime": _version("onnxruntime")}}
        spec["global"] = _network_meta(chain.glob, "global.onnx", network(chain.glob, "global", tmp), global_ckpt)
        spec["thresholds"] = {c: _f32(t) for c, t in zip(CLASSES, chain.thr.tolist())}
        spec["inference"] = {"tta": opts.tta, "scales": list(opts.scales), "overlap": opts.overlap,
                             "window_sigma": SIGMA_SCALE, "window_batch": WINDOW_BATCH,
                             "mask": "p > threshold per class; probabilities upsampled bilinearly "
                                     "(align_corners=False) from the network size to the source size"}
        if chain.palm is not None:
            palm = chain.palm
            spec["palm"] = _network_meta(palm.predictor, "palm.onnx", network(palm.predictor, "palm", tmp), palm_ckpt)
            spec["palm"]["box_rule"] = {**palm.rule.to_dict(), "extent": extent_rule()}
            spec["upscaler"] = _upscaler(palm.upscaler, opts, tmp, fp16, opset, summary)
            weights = chain.weights.tolist()
            spec["fusion"] = {"fuse_weights": {c: _f32(weights[i]) for c, i in zip(palm.classes, palm.channels)},
                              "feather": opts.feather, "palm_resize": opts.palm_resize,
                              "calibration": chain.calibrated_by,
                              "rule": "inside the box p = (1 - a_c*w)*p_global + a_c*w*p_palm, w the feather "
                                      "window (1 inside, ramps of feather*side to 0 at box borders that are not "
                                      "image borders)"}
        summary.files = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.onnx"))}
        spec["files"] = dict(summary.files)
        import yaml

        write_text_atomic(tmp / CHAIN_FILE, "# twostage export: run with `twostage infer IMAGES --exported DIR "
                                            "--backend onnxruntime`; see docs/deploying.md\n"
                          + yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100))
    return summary


def export_upscaler(network: nn.Module, path: Path, *, fp16: bool = False, opset: int = DEFAULT_OPSET) -> dict:
    """`export_network` for an upscaler (RGB in [0, 1] in, RGB x scale out): only with dynamic
    sizes, since crops and tiles vary."""
    return export_network(network, "upscaler", (2, 3, 32, 32), path, fp16=fp16, opset=opset, allow_fixed=False,
                          fixed_reason="crops and tiles vary in size", activation=lambda t: t,
                          sample=lambda s, g: torch.rand(s, generator=g))


def _upscaler(upscaler, opts, tmp: Path, fp16: bool, opset: int, summary: ExportSummary) -> dict:
    """chain.yaml's upscaler section (and upscaler.onnx for a network)."""
    section = {**upscaler.record(), "file": None, "tile": opts.upscaler_tile, "tile_pad": opts.upscaler_tile_pad,
               "pre_pad": opts.upscaler_pre_pad}
    if upscaler.network is None:
        section["rule"] = "cv2.resize INTER_CUBIC of the uint8 crop by scale"
        return section
    record = export_upscaler(upscaler.network, tmp / "upscaler.onnx", fp16=fp16, opset=opset)
    summary.networks["upscaler"] = record
    section.update(file="upscaler.onnx", export=record,
                   io={"input": "(B, 3, h, w) float32 RGB in [0, 1]: the grey crop /255 repeated, reflect-padded "
                                "by pre_pad, cut into tiles of `tile` (+ tile_pad) when tile > 0",
                       "output": "(B, 3, h*scale, w*scale); mean of the channels, clamp to [0, 1], *255, round"})
    return section


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
