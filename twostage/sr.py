"""Upscalers for palm crops behind one small interface: image in, image `scale`x larger out.

`make_upscaler(name)` gives a deterministic `bicubic` (no weights, any integer scale) or a
Real-ESRGAN network (RealESRGAN_x4plus, RealESRGAN_x2plus, realesr-general-x4v3) run through
`realesrgan.RealESRGANer`'s pre-padding / tiling / post-processing. The upscaler's
`record()` (name, scale, weight sha256) is stored with the palm set and the palm checkpoint
so inference feeds the palm model crops made exactly like its training crops.

Unlike RealESRGANer.enhance, calls are pure (per-call tensors live on a throwaway runner,
not on the upscaler), bit depth comes from the dtype (uint8 or uint16, never guessed from
pixel values), grayscale stays grayscale, fp16 is used only on CUDA, tile errors propagate
instead of being printed, and the output is checked finite.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from .errors import TwostageError

UPSCALERS = ("bicubic", "RealESRGAN_x4plus", "RealESRGAN_x2plus", "realesr-general-x4v3")
"""Names `make_upscaler` knows by default; any other manifest entry, or a network `twostage
train-sr` trained into the weights folder, works too."""


def _check_image(img: np.ndarray) -> float:
    """Validate an (h, w) uint8/uint16 image; return its full-scale value (from the dtype)."""
    if not isinstance(img, np.ndarray) or img.ndim != 2:
        raise TwostageError(f"upscaler input: expected an (h, w) grayscale array, got shape {getattr(img, 'shape', None)}")
    if img.dtype == np.uint8:
        return 255.0
    if img.dtype == np.uint16:
        return 65535.0
    raise TwostageError(f"upscaler input: unsupported dtype {img.dtype} (expected uint8 or uint16)")


def tile_hint(tile: int) -> str:
    """What to lower when a network upscaler runs out of memory."""
    return f"--tile (the upscaler's tile size, now {tile if tile else 'off: the whole crop at once'}; e.g. --tile 256)"


class Upscaler:
    """Callable (h, w) uint8/uint16 -> (h·scale, w·scale) same dtype. `device` and `lower`
    (what to reduce when it runs out of memory) go into that error. `network` is the
    basicsr network a Real-ESRGAN upscaler runs (None for bicubic): what `twostage export`
    writes as ONNX."""

    def __init__(self, name: str, scale: int, weight_sha256: str | None, fn: Callable[[np.ndarray, float], np.ndarray],
                 device: str = "cpu", lower: str = "the crop size (the palm box side × scale)", network=None):
        self.name = name
        self.scale = int(scale)
        self.weight_sha256 = weight_sha256
        self.network = network
        self._fn = fn
        self.device, self.lower = device, lower

    def __call__(self, img: np.ndarray) -> np.ndarray:
        from .devices import out_of_memory_as_error

        full = _check_image(img)
        h, w = img.shape
        with out_of_memory_as_error(f"{self.name}: upscaling a {w}x{h} crop x{self.scale} on {self.device}", self.lower):
            out = self._fn(img, full)
        if out.shape != (h * self.scale, w * self.scale) or out.dtype != img.dtype:
            raise RuntimeError(f"{self.name}: produced {out.shape} {out.dtype}, expected "
                               f"{(h * self.scale, w * self.scale)} {img.dtype}")
        return out

    def record(self) -> dict:
        """What made a crop: compared between the palm set, the palm checkpoint and inference."""
        return {"upscaler": self.name, "scale": self.scale, "weight_sha256": self.weight_sha256}

    def __repr__(self) -> str:
        return f"Upscaler({self.name!r}, scale={self.scale})"


def _bicubic(scale: int) -> Callable[[np.ndarray, float], np.ndarray]:
    import cv2

    def run(img: np.ndarray, full: float) -> np.ndarray:
        h, w = img.shape
        return cv2.resize(img, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC)

    return run


def _runner_class():
    """A RealESRGANer subclass that reuses its pre/post-processing and tiling around a model we
    loaded and verified ourselves (RealESRGANer's own loader uses torch.load without
    weights_only and downloads URLs). One instance per call holds that call's tensors."""
    import math

    from .compat import install_functional_tensor_shim

    install_functional_tensor_shim()
    from realesrgan import RealESRGANer

    class _Run(RealESRGANer):
        def __init__(self, model, scale: int, tile: int, tile_pad: int, pre_pad: int, half: bool, device):
            # Deliberately not calling RealESRGANer.__init__: it loads weights from a path.
            self.scale, self.tile_size, self.tile_pad, self.pre_pad = scale, tile, tile_pad, pre_pad
            self.mod_scale, self.half, self.device, self.model = None, half, device, model

        def tile_process(self) -> None:
            """RealESRGANer's tiling, without its per-tile print and its swallowed RuntimeError."""
            _, c, height, width = self.img.shape
            self.output = self.img.new_zeros((1, c, height * self.scale, width * self.scale))
            t, pad, s = self.tile_size, self.tile_pad, self.scale
            for y in range(math.ceil(height / t)):
                for x in range(math.ceil(width / t)):
                    x0, y0 = x * t, y * t
                    x1, y1 = min(x0 + t, width), min(y0 + t, height)
                    px0, py0 = max(x0 - pad, 0), max(y0 - pad, 0)
                    px1, py1 = min(x1 + pad, width), min(y1 + pad, height)
                    out = self.model(self.img[:, :, py0:py1, px0:px1])
                    ox, oy = (x0 - px0) * s, (y0 - py0) * s
                    self.output[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = \
                        out[:, :, oy:oy + (y1 - y0) * s, ox:ox + (x1 - x0) * s]

    return _Run


def _realesrgan(model, scale: int, tile: int, tile_pad: int, pre_pad: int, device: str,
                name: str) -> Callable[[np.ndarray, float], np.ndarray]:
    import torch

    from .devices import torch_device

    dev = torch_device(device)
    half = dev.type == "cuda"  # fp16 only where it is fast and implemented
    model = model.to(dev)
    if half:
        model = model.half()
    run_cls = _runner_class()

    def run(img: np.ndarray, full: float) -> np.ndarray:
        rgb = np.repeat((img.astype(np.float32) / full)[:, :, None], 3, axis=2)  # grayscale -> 3 channels
        runner = run_cls(model, scale, tile, tile_pad, pre_pad, half, dev)
        with torch.inference_mode():
            runner.pre_process(rgb)
            if tile > 0:
                runner.tile_process()
            else:
                runner.process()
            out = runner.post_process().float().mean(1)[0]  # channels back to one
            if not torch.isfinite(out).all():
                raise TwostageError(f"{name}: non-finite output (fp16 overflow or broken weights?)")
            out = out.clamp_(0, 1).cpu().numpy()
        return np.rint(out * full).astype(img.dtype)

    return run


def make_upscaler(name: str, scale: int | None = None, tile: int = 0, tile_pad: int = 10, pre_pad: int = 0,
                  device: str = "cpu", weights_dir: str | os.PathLike | None = None,
                  manifest: str | os.PathLike | None = None, trust_unpinned: bool = False) -> Upscaler:
    """Build an upscaler by name.

    Args:
        name: "bicubic" or a weights-manifest entry (see UPSCALERS).
        scale: output/input size ratio; required for bicubic (default 4), must equal the
            network's scale for Real-ESRGAN (None: the network's).
        tile, tile_pad, pre_pad: RealESRGANer tiling (tile 0 = whole crop at once) and padding.
        device: torch device for the network ("cpu", "cuda", "cuda:1"); fp16 on CUDA only.
        weights_dir, manifest, trust_unpinned: see `twostage.weights`.
    """
    for arg, v in (("tile", tile), ("tile_pad", tile_pad), ("pre_pad", pre_pad)):
        if not isinstance(v, int) or v < 0:
            raise TwostageError(f"upscaler {arg} {v!r}: must be a non-negative integer")
    if name == "bicubic":
        s = 4 if scale is None else scale
        if not isinstance(s, (int, np.integer)) or s < 1:
            raise TwostageError(f"bicubic scale {s!r}: must be a positive integer")
        return Upscaler("bicubic", int(s), None, _bicubic(int(s)))
    from . import weights

    known, mpath = weights.all_specs(weights_dir, manifest)
    if name not in known:
        raise TwostageError(f"upscaler {name!r}: unknown; choose one of: bicubic, {', '.join(known)} "
                            f"(manifest {mpath})")
    model, spec, sha = weights.load_model(name, weights_dir, mpath, trust_unpinned)
    if scale is not None and scale != spec.scale:
        raise TwostageError(f"upscaler {name}: scale {scale} requested but the network upscales x{spec.scale}; "
                            f"use --scale {spec.scale} or bicubic")
    return network_upscaler(model, name, spec.scale, sha, tile, tile_pad, pre_pad, device)


def network_upscaler(model, name: str, scale: int, weight_sha256: str | None, tile: int = 0, tile_pad: int = 10,
                     pre_pad: int = 0, device: str = "cpu") -> Upscaler:
    """An Upscaler around a loaded network (3 channels in and out: a basicsr network, or its
    ONNX form from `onnx_backend`), run as RealESRGANer runs it; `make_upscaler` verifies and
    loads the file first."""
    return Upscaler(name, scale, weight_sha256, _realesrgan(model, scale, tile, tile_pad, pre_pad, device, name),
                    device=device, lower=tile_hint(tile), network=model)
