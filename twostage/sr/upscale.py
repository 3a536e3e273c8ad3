"""Upscalers for palm crops behind one small interface: image in, image `scale`x larger out.

`make_upscaler(name)` gives a deterministic `bicubic` (no weights, any integer scale) or a
Real-ESRGAN network (RealESRGAN_x4plus, RealESRGAN_x2plus, realesr-general-x4v3) run with
`realesrgan.RealESRGANer`'s pre-padding / tiling / post-processing, re-done in torch so a
crop on the GPU stays there (tests/test_sr.py checks it against RealESRGANer's own code).
The upscaler's `record()` (name, scale, weight sha256) is stored with the palm set and the
palm checkpoint so inference feeds the palm model crops made exactly like its training crops.

Unlike RealESRGANer.enhance, calls are pure (no per-call state is kept on the upscaler), bit
depth comes from the dtype (uint8 or uint16, never guessed from pixel values), grayscale stays
grayscale, fp16 is used only on CUDA, tile errors propagate instead of being printed, and the
output is checked finite.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from ..errors import TwostageError

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
    """Callable (h, w) uint8/uint16 numpy -> (h·scale, w·scale) same dtype; `tensor` does the
    same for a torch image on any device and returns it on the upscaler's device, so a crop
    that is already there never goes through host memory. `device` and `lower` (what to reduce
    when it runs out of memory) go into that error."""

    def __init__(self, name: str, scale: int, weight_sha256: str | None, fn, device: str = "cpu",
                 lower: str = "the crop size (the palm box side × scale)", on_tensors: bool = False, network=None):
        self.name = name
        self.scale = int(scale)
        self.weight_sha256 = weight_sha256
        self.network = network  # the network a Real-ESRGAN upscaler runs (None: bicubic); `twostage export` writes it
        self._fn = fn  # on_tensors: (h, w) tensor, full-scale value -> rounded float tensor; else numpy -> numpy
        self._on_tensors = on_tensors
        self.device, self.lower = device, lower

    def __call__(self, img: np.ndarray) -> np.ndarray:
        full = _check_image(img)
        if not self._on_tensors:
            return self._run(img, full, img.dtype)
        import torch

        x = torch.from_numpy(img if img.dtype == np.uint8 else img.astype(np.int32))  # torch lacks uint16 maths
        return self._run(x, full, img.dtype).cpu().numpy().astype(img.dtype)

    def tensor(self, img):
        """(h, w) uint8 torch image on any device -> (h·scale, w·scale) uint8 on the upscaler's
        device (bicubic: on the image's device), without a host round trip for a network."""
        import torch

        if not isinstance(img, torch.Tensor) or img.ndim != 2 or img.dtype != torch.uint8:
            raise TwostageError(f"upscaler input: expected an (h, w) uint8 tensor, got "
                                f"{getattr(img, 'dtype', type(img).__name__)} {tuple(getattr(img, 'shape', ()))}")
        if not self._on_tensors:
            return torch.from_numpy(self(img.cpu().numpy())).to(img.device)
        return self._run(img, 255.0, np.dtype(np.uint8)).to(torch.uint8)

    def _run(self, img, full: float, dtype: np.dtype):
        from ..devices import out_of_memory_as_error

        h, w = img.shape
        with out_of_memory_as_error(f"{self.name}: upscaling a {w}x{h} crop x{self.scale} on {self.device}", self.lower):
            out = self._fn(img, full)
        if tuple(out.shape) != (h * self.scale, w * self.scale) or (not self._on_tensors and out.dtype != dtype):
            raise RuntimeError(f"{self.name}: produced {tuple(out.shape)} {out.dtype}, expected "
                               f"{(h * self.scale, w * self.scale)} {dtype}")
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


def _tiled(model, img, scale: int, tile: int, pad: int):
    """RealESRGANer's tiling: each tile with `pad` pixels of context, its centre kept."""
    import math

    _, c, height, width = img.shape
    out = img.new_zeros((1, c, height * scale, width * scale))
    for y in range(math.ceil(height / tile)):
        for x in range(math.ceil(width / tile)):
            x0, y0 = x * tile, y * tile
            x1, y1 = min(x0 + tile, width), min(y0 + tile, height)
            px0, py0 = max(x0 - pad, 0), max(y0 - pad, 0)
            px1, py1 = min(x1 + pad, width), min(y1 + pad, height)
            part = model(img[:, :, py0:py1, px0:px1])
            ox, oy = (x0 - px0) * scale, (y0 - py0) * scale
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                part[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
    return out


def _realesrgan(model, scale: int, tile: int, tile_pad: int, pre_pad: int, device: str, name: str):
    """RealESRGANer.enhance's path for a grey image, in torch on `device`: the grey value
    repeated to 3 channels in the memory layout of its numpy input (the same strides: the
    convolutions then round exactly as there), reflect pre-padding, the mod padding of x2/x1
    networks, whole or tiled forward, padding removed, channels averaged back to one, clamped,
    rounded to the bit depth. fp16 on CUDA only."""
    import torch
    import torch.nn.functional as F

    from ..devices import torch_device

    dev = torch_device(device)
    half = dev.type == "cuda"  # fp16 only where it is fast and implemented
    model = model.to(dev)
    if half:
        model = model.half()
    mod = {2: 2, 1: 4}.get(scale)

    def run(img, full: float):
        h, w = img.shape
        x = (img.to(dev).float() / full)[:, :, None].expand(h, w, 3).contiguous().permute(2, 0, 1).unsqueeze(0)
        if half:
            x = x.half()
        with torch.inference_mode():
            if pre_pad:
                x = F.pad(x, (0, pre_pad, 0, pre_pad), "reflect")
            ph = pw = 0
            if mod is not None:
                ph, pw = (-x.shape[2]) % mod, (-x.shape[3]) % mod
                x = F.pad(x, (0, pw, 0, ph), "reflect")
            y = _tiled(model, x, scale, tile, tile_pad) if tile > 0 else model(x)
            y = y[:, :, :y.shape[2] - (ph + pre_pad) * scale, :y.shape[3] - (pw + pre_pad) * scale]
            out = y.float().mean(1)[0]
            if not torch.isfinite(out).all():
                raise TwostageError(f"{name}: non-finite output (fp16 overflow or broken weights?)")
            return out.clamp_(0, 1).mul_(full).round_()

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
        weights_dir, manifest, trust_unpinned: see `twostage.sr.weights`.
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
                    device=device, lower=tile_hint(tile), on_tensors=True, network=model)
