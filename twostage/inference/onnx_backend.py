"""The ONNX Runtime backend: an exported folder (`export.py`) run as the same `chain.TwoStage`
(docs/DESIGN.md §3 "Export").

Only the network calls change: `OnnxNet` is an `nn.Module` whose forward runs an ONNX Runtime
session, put where the PyTorch networks sit (`Predictor.model`, the upscaler's network). The
resize and normalisation, TTA flips, scales, sliding windows, the box, the crop, fusion,
thresholds and the RLE stay the chain's own code, with the settings chain.yaml recorded.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..classes import CLASSES
from ..errors import TwostageError
from ..io.files import sha256_file
from ..io.readers import read_yaml

FORMAT = "twostage-export-1"
CHAIN_FILE = "chain.yaml"
NETWORKS = ("global", "palm", "upscaler")

RUNTIME_OPTIONS = ("device", "upscaler_tile", "accumulate")
"""ChainOptions that `infer --exported` takes: where and in how much memory the chain runs.
The others define its result and were fixed at export (chain.yaml)."""


def providers(device: torch.device) -> list:
    """ONNX Runtime execution providers for a torch device: CPU, or CUDA where installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise TwostageError("--backend onnxruntime: onnxruntime is not installed "
                            "(pip install 'twostage[onnx]')") from None
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            have = ", ".join(ort.get_available_providers())
            raise TwostageError(f"--device {device}: this onnxruntime has no CUDA provider (it has {have}); "
                                "install onnxruntime-gpu or use --device cpu")
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    raise TwostageError(f"--device {device}: --backend onnxruntime runs on cpu or cuda")


class OnnxNet(nn.Module):
    """A network's forward run by ONNX Runtime: (N, C, H, W) tensor on any device → its output
    as a float32 tensor on that device. `fixed` (h, w): the file takes only inputs of that size
    (`why` says why), refused here in one line instead of by the runtime."""

    def __init__(self, path: str | os.PathLike, device: torch.device, fixed: tuple[int, int] | None = None,
                 why: str = ""):
        super().__init__()
        import onnxruntime as ort

        self.path, self.fixed, self.why = Path(path), fixed, why
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the runtime's notes on unused initialisers are noise here
        # no spinning between calls: the chain's own torch work runs in between, on the same cores
        # (benchmarks/onnx.py: at 512² the ONNX Runtime chain went from 2x slower than PyTorch to faster)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers(device))
        except TwostageError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for any damage
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TwostageError(f"{path}: onnxruntime cannot load it ({line})") from None
        self.input, self.output = self.session.get_inputs()[0].name, self.session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None and tuple(x.shape[-2:]) != tuple(self.fixed):
            raise TwostageError(f"{self.path}: exported for {self.fixed[1]}x{self.fixed[0]} inputs only ({self.why}); "
                                f"got {x.shape[-1]}x{x.shape[-2]}")
        feed = np.ascontiguousarray(x.detach().float().cpu().numpy())
        out = self.session.run([self.output], {self.input: feed})[0]
        return torch.from_numpy(out).to(x.device)


def _net(folder: Path, section: dict, device: torch.device) -> OnnxNet:
    record = section.get("export") or {}
    fixed = record.get("fixed_size")
    return OnnxNet(folder / section["file"], device, tuple(fixed) if fixed else None, record.get("why_fixed", ""))


def _predictor(folder: Path, section: dict, device: torch.device):
    """A `Predictor` whose network is the ONNX file: the one preprocessing path, TTA and windows."""
    from ..models import Predictor

    meta = {"classes": section["classes"], "input_size": section["input_size"],
            "normalization": section["normalization"], "model": {"in_channels": section["in_channels"]},
            "window": section.get("window")}
    return Predictor(_net(folder, section, device), meta, device)


def check_runtime_options(options: dict, folder: str | os.PathLike) -> None:
    """An exported chain runs as recorded: an option that would change its result is refused."""
    from .chain import ChainOptions

    default = ChainOptions()
    given = sorted(k for k, v in options.items() if k not in RUNTIME_OPTIONS and v != getattr(default, k))
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise TwostageError(f"{flags}: fixed in {folder}/chain.yaml at export (give it to `twostage export`); "
                            "with --exported only --device, --tile and --accumulate apply")


def exported_chain(folder: str | os.PathLike, device: str = "cpu", upscaler_tile: int | None = None,
                   accumulate: str = "device"):
    """The `chain.TwoStage` of an exported folder (verified by `read_exported`), its
    networks run by ONNX Runtime on `device` (cpu, or cuda through the CUDA provider)."""
    from ..box import BoxRule
    from ..devices import torch_device
    from ..sr.upscale import make_upscaler, network_upscaler
    from .chain import ChainOptions, PalmStage, TwoStage

    folder = Path(folder)
    spec = read_exported(folder)
    dev = torch_device(device)
    providers(dev)  # a missing runtime or provider is said as such, before chain.yaml's values
    where = folder / CHAIN_FILE
    try:
        inference, up, fusion = spec["inference"], spec.get("upscaler") or {}, spec.get("fusion") or {}
        options = ChainOptions(
            device=device, tta=inference["tta"], scales=inference["scales"], overlap=inference["overlap"],
            thresholds=spec["thresholds"], fuse_weights=fusion.get("fuse_weights"),
            feather=fusion.get("feather", ChainOptions.feather), palm_resize=fusion.get("palm_resize", "bilinear"),
            upscaler_tile=up.get("tile", 0) if upscaler_tile is None else upscaler_tile,
            upscaler_tile_pad=up.get("tile_pad", 10), upscaler_pre_pad=up.get("pre_pad", 0),
            calibration="none", accumulate=accumulate)
        glob = _predictor(folder, spec["global"], dev)
        palm = None
        if spec.get("palm") is not None:
            if up.get("file") is None:
                upscaler = make_upscaler(up["upscaler"], scale=up["scale"])
            else:  # its torch side (padding, tiles) on the CPU: the session feeds its own device
                upscaler = network_upscaler(_net(folder, up, dev), up["upscaler"], up["scale"], up["weight_sha256"],
                                            options.upscaler_tile, options.upscaler_tile_pad, options.upscaler_pre_pad)
            palm = PalmStage(_predictor(folder, spec["palm"], dev), BoxRule.from_dict(
                {k: v for k, v in spec["palm"]["box_rule"].items() if k != "extent"}), upscaler, options,
                folder / spec["palm"]["file"])
        return TwoStage(glob, palm, options, dev, calibrated_by=fusion.get("calibration"))
    except TwostageError as e:  # a value's own check: named here unless it names a file of the folder
        if str(folder) in str(e):
            raise
        raise TwostageError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
        raise TwostageError(f"{where}: damaged ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- the exported folder

def read_exported(folder: str | os.PathLike) -> dict:
    """chain.yaml of an exported folder, every listed file present with its recorded sha256.

    Anything else (no folder, no or damaged chain.yaml, another format, a missing, extra-listed
    or changed file) is one TwostageError naming the folder or file: a changed network is
    never run."""
    folder = Path(folder)
    path = folder / CHAIN_FILE
    if not folder.is_dir():
        raise TwostageError(f"{folder}: no such folder (make one with `twostage export`)")
    if not path.is_file():
        raise TwostageError(f"{folder}: not an exported chain (no {CHAIN_FILE}; make one with `twostage export`)")
    spec = read_yaml(path, "exported chain")
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise TwostageError(f"{path}: not a twostage export (format {FORMAT!r} expected)")
    files = spec.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise TwostageError(f"{path}: 'files' must map file names to sha256")
    for name in NETWORKS:
        section = spec.get(name)
        if section is None or (name == "upscaler" and isinstance(section, dict) and section.get("file") is None):
            continue
        if not isinstance(section, dict) or section.get("file") not in files:
            raise TwostageError(f"{path}: the {name} section names no file listed under 'files'")
    for name, sha in files.items():
        f = folder / name
        if Path(name).name != name or not f.is_file():
            raise TwostageError(f"{f}: missing (listed in {path})")
        have = sha256_file(f)
        if have != sha:
            raise TwostageError(f"{f}: sha256 {have} differs from {sha} recorded in {path}; the file changed "
                                "after export and is not run (export again)")
    if spec.get("classes") != list(CLASSES) or not isinstance(spec.get("global"), dict):
        raise TwostageError(f"{path}: not a twostage export of the {len(CLASSES)} classes (classes or global missing)")
    return spec
