"""Real-ESRGAN's degradation model: how super-resolution training turns a high-resolution
radiograph patch into the low-resolution input the network learns to undo.

The second-order pipeline of Real-ESRGAN (Wang et al., 2021): blur, random resize, noise,
JPEG; again blur, resize, noise; then resize to 1/scale with a sinc filter and JPEG in a
random order. Every operation is basicsr's own (`random_mixed_kernels`,
`circular_lowpass_kernel`, `filter2D`, the Gaussian and Poisson noise, `DiffJPEG`) and the
option names and defaults are those of Real-ESRGAN's `train_realesrnet_x4plus.yml`, so a
config can be copied from there. What differs (docs/DESIGN.md §4): it runs on any torch
device, each patch of a batch gets its own resize, noise and JPEG (Real-ESRGAN shares them
across a batch and mixes batches through a 180-pair queue instead), and the noise is grey
(radiographs are grey; `gray_noise_prob` 1.0). Randomness comes from the global `random`,
`numpy.random` and torch generators, as in basicsr; `twostage.sr.training` seeds them per step.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from ..config import option
from ..errors import TwostageError

KERNEL_SIZE = 21
"""Blur kernels are 7..21 pixels, padded to 21 (as in Real-ESRGAN)."""

KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_PROB = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]

MIN_PATCH = 96
"""Smallest high-resolution patch: the strongest first resize (0.15) must leave more pixels than
the blur kernel's 10-pixel reflection padding."""


@dataclass
class DegradationConfig:
    """Real-ESRGAN's degradation options (same names, same defaults except grey noise)."""

    kernel_list: list[str] = option(list(KERNELS), "first blur: kernel types (basicsr random_mixed_kernels)")
    kernel_prob: list[float] = option(list(_PROB), "first blur: probability of each kernel type")
    sinc_prob: float = option(0.1, "first blur: probability of a sinc (ringing) kernel instead")
    blur_sigma: list[float] = option([0.2, 3.0], "first blur: sigma range in pixels")
    betag_range: list[float] = option([0.5, 4.0], "first blur: shape range of generalized Gaussian kernels")
    betap_range: list[float] = option([1.0, 2.0], "first blur: shape range of plateau kernels")
    resize_prob: list[float] = option([0.2, 0.7, 0.1], "first resize: probabilities of up, down, keep")
    resize_range: list[float] = option([0.15, 1.5], "first resize: scale range")
    gaussian_noise_prob: float = option(0.5, "first noise: probability of Gaussian (else Poisson) noise")
    noise_range: list[float] = option([1.0, 30.0], "first noise: Gaussian sigma range (grey levels of 255)")
    poisson_scale_range: list[float] = option([0.05, 3.0], "first noise: Poisson scale range")
    gray_noise_prob: float = option(1.0, "first noise: probability of grey noise (Real-ESRGAN 0.4; radiographs are grey)")
    jpeg_range: list[float] = option([30.0, 95.0], "first JPEG: quality range")
    kernel_list2: list[str] = option(list(KERNELS), "second blur: kernel types")
    kernel_prob2: list[float] = option(list(_PROB), "second blur: probability of each kernel type")
    sinc_prob2: float = option(0.1, "second blur: probability of a sinc kernel instead")
    blur_sigma2: list[float] = option([0.2, 1.5], "second blur: sigma range")
    betag_range2: list[float] = option([0.5, 4.0], "second blur: generalized Gaussian shape range")
    betap_range2: list[float] = option([1.0, 2.0], "second blur: plateau shape range")
    second_blur_prob: float = option(0.8, "probability of the second blur")
    resize_prob2: list[float] = option([0.3, 0.4, 0.3], "second resize: probabilities of up, down, keep")
    resize_range2: list[float] = option([0.3, 1.2], "second resize: scale range (relative to 1/scale)")
    gaussian_noise_prob2: float = option(0.5, "second noise: probability of Gaussian (else Poisson) noise")
    noise_range2: list[float] = option([1.0, 25.0], "second noise: Gaussian sigma range")
    poisson_scale_range2: list[float] = option([0.05, 2.5], "second noise: Poisson scale range")
    gray_noise_prob2: float = option(1.0, "second noise: probability of grey noise")
    jpeg_range2: list[float] = option([30.0, 95.0], "final JPEG: quality range")
    final_sinc_prob: float = option(0.8, "probability of the final sinc filter")


def check_degradation(cfg: DegradationConfig) -> None:
    """Ranges that basicsr would only trip over mid-training."""
    for suffix in ("", "2"):
        kinds, probs = getattr(cfg, "kernel_list" + suffix), getattr(cfg, "kernel_prob" + suffix)
        bad = sorted(set(kinds) - set(KERNELS))
        if bad or len(kinds) != len(probs) or not kinds:
            raise TwostageError(f"degradation.kernel_list{suffix}/kernel_prob{suffix}: one probability per kernel "
                                f"type, types from {', '.join(KERNELS)}" + (f" (unknown: {', '.join(bad)})" if bad else ""))
    for name in ("kernel_prob", "kernel_prob2", "resize_prob", "resize_prob2"):
        p = getattr(cfg, name)
        if any(x < 0 for x in p) or sum(p) <= 0 or (name.startswith("resize") and len(p) != 3):
            raise TwostageError(f"degradation.{name}={p}: non-negative weights, not all 0"
                                + (" (up, down, keep)" if name.startswith("resize") else ""))
    for name in ("sinc_prob", "sinc_prob2", "gaussian_noise_prob", "gaussian_noise_prob2", "gray_noise_prob",
                 "gray_noise_prob2", "second_blur_prob", "final_sinc_prob"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise TwostageError(f"degradation.{name}={getattr(cfg, name)}: a probability from 0 to 1")
    for name, lo, hi in (("blur_sigma", 0.01, 20), ("blur_sigma2", 0.01, 20), ("betag_range", 0.01, 20),
                         ("betag_range2", 0.01, 20), ("betap_range", 0.01, 20), ("betap_range2", 0.01, 20),
                         ("resize_range", 0.15, 4), ("resize_range2", 0.15, 4), ("noise_range", 0, 255),
                         ("noise_range2", 0, 255), ("poisson_scale_range", 0, 100),
                         ("poisson_scale_range2", 0, 100), ("jpeg_range", 1, 100), ("jpeg_range2", 1, 100)):
        r = getattr(cfg, name)
        if len(r) != 2 or not lo <= r[0] <= r[1] <= hi:
            raise TwostageError(f"degradation.{name}={r}: [low, high] with {lo} <= low <= high <= {hi}")
    if cfg.resize_range[0] > 1 or cfg.resize_range[1] < 1 or cfg.resize_range2[0] > 1 or cfg.resize_range2[1] < 1:
        raise TwostageError("degradation.resize_range/resize_range2: [down, up] around 1, e.g. [0.15, 1.5]")


def _blur_kernel(kinds: list[str], probs: list[float], sigma: list[float], betag: list[float],
                 betap: list[float], sinc_prob: float) -> np.ndarray:
    from basicsr.data.degradations import circular_lowpass_kernel, random_mixed_kernels

    size = random.choice(range(7, KERNEL_SIZE + 1, 2))
    if np.random.uniform() < sinc_prob:
        omega = np.random.uniform(np.pi / 3, np.pi) if size < 13 else np.random.uniform(np.pi / 5, np.pi)
        kernel = circular_lowpass_kernel(omega, size, pad_to=False)
    else:
        kernel = random_mixed_kernels(kinds, probs, size, sigma, sigma, [-math.pi, math.pi], betag, betap,
                                      noise_range=None)
    pad = (KERNEL_SIZE - size) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def sample_kernels(cfg: DegradationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first blur, second blur, final sinc) kernels of one patch, each 21 x 21."""
    from basicsr.data.degradations import circular_lowpass_kernel

    k1 = _blur_kernel(cfg.kernel_list, cfg.kernel_prob, cfg.blur_sigma, cfg.betag_range, cfg.betap_range,
                      cfg.sinc_prob)
    k2 = _blur_kernel(cfg.kernel_list2, cfg.kernel_prob2, cfg.blur_sigma2, cfg.betag_range2, cfg.betap_range2,
                      cfg.sinc_prob2)
    if np.random.uniform() < cfg.final_sinc_prob:
        size = random.choice(range(7, KERNEL_SIZE + 1, 2))
        sinc = circular_lowpass_kernel(np.random.uniform(np.pi / 3, np.pi), size, pad_to=KERNEL_SIZE)
    else:  # a unit pulse: no filtering
        sinc = np.zeros((KERNEL_SIZE, KERNEL_SIZE))
        sinc[KERNEL_SIZE // 2, KERNEL_SIZE // 2] = 1
    return k1, k2, sinc


class Degrader:
    """(B, 3, H, W) high-resolution batch in [0, 1] -> (B, 3, H/scale, W/scale), 8-bit levels."""

    def __init__(self, cfg: DegradationConfig, scale: int, device="cpu"):
        import torch

        from .compat import install_functional_tensor_shim

        install_functional_tensor_shim()
        from basicsr.utils import DiffJPEG

        check_degradation(cfg)
        self.cfg, self.scale = cfg, int(scale)
        self.device = torch.device(device)
        self.jpeger = DiffJPEG(differentiable=False).to(self.device)

    def __call__(self, gt):
        import torch

        h, w = gt.shape[-2:]
        if min(h, w) < MIN_PATCH or h % self.scale or w % self.scale:
            raise TwostageError(f"degradation: a {w}x{h} patch; need sides >= {MIN_PATCH} and divisible by "
                                f"{self.scale}")
        with torch.no_grad():
            return torch.cat([self._one(gt[i:i + 1]) for i in range(gt.shape[0])])

    def _resize(self, x, probs, rng, size=None):
        from torch.nn import functional as F

        kind = random.choices(["up", "down", "keep"], probs)[0]
        s = np.random.uniform(1, rng[1]) if kind == "up" else np.random.uniform(rng[0], 1) if kind == "down" else 1
        mode = random.choice(["area", "bilinear", "bicubic"])
        if size is None:
            return F.interpolate(x, scale_factor=s, mode=mode)
        return F.interpolate(x, size=(max(1, int(size[0] * s)), max(1, int(size[1] * s))), mode=mode)

    def _noise(self, x, gaussian_prob, sigma, poisson, gray):
        from basicsr.data.degradations import random_add_gaussian_noise_pt, random_add_poisson_noise_pt

        if np.random.uniform() < gaussian_prob:
            return random_add_gaussian_noise_pt(x, sigma_range=sigma, clip=True, rounds=False, gray_prob=gray)
        return random_add_poisson_noise_pt(x, scale_range=poisson, gray_prob=gray, clip=True, rounds=False)

    def _jpeg(self, x, quality):
        import torch

        q = x.new_zeros(x.shape[0]).uniform_(*quality)
        return self.jpeger(torch.clamp(x, 0, 1), quality=q)

    def _one(self, gt):
        import torch
        from basicsr.utils.img_process_util import filter2D
        from torch.nn import functional as F

        c = self.cfg
        k1, k2, sinc = (torch.as_tensor(k, dtype=torch.float32, device=gt.device)[None] for k in sample_kernels(c))
        h, w = gt.shape[-2:]
        out = filter2D(gt, k1)
        out = self._resize(out, c.resize_prob, c.resize_range)
        out = self._noise(out, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob)
        out = self._jpeg(out, c.jpeg_range)
        if np.random.uniform() < c.second_blur_prob:
            out = filter2D(out, k2)
        out = self._resize(out, c.resize_prob2, c.resize_range2, size=(h / self.scale, w / self.scale))
        out = self._noise(out, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2)
        lr = (h // self.scale, w // self.scale)
        if np.random.uniform() < 0.5:  # [resize back + sinc] then JPEG, or the other way round
            out = filter2D(F.interpolate(out, size=lr, mode=random.choice(["area", "bilinear", "bicubic"])), sinc)
            out = self._jpeg(out, c.jpeg_range2)
        else:
            out = self._jpeg(out, c.jpeg_range2)
            out = filter2D(F.interpolate(out, size=lr, mode=random.choice(["area", "bilinear", "bicubic"])), sinc)
        return torch.clamp((out * 255.0).round(), 0, 255) / 255.0
