"""How good a super-resolution network is: basicsr's PSNR/SSIM on held-out palm regions, two
ways (area-downsampled and through the training degradation), beside bicubic. train-sr scores
every val_every steps and records it in trained.yaml; benchmarks/srseg.py scores a finished one."""
from __future__ import annotations

import numpy as np

from .degrade import MIN_PATCH
from .patches import step_seed, to_tensor
from .train_config import SRConfig


def _centre(region: np.ndarray, side: int, scale: int) -> np.ndarray:
    """The centre crop scored: at most side², cut to a multiple of the scale so it downsamples exactly."""
    h, w = region.shape
    sh, sw = (min(h, side), min(w, side)) if side else (h, w)
    sh, sw = sh - sh % scale, sw - sw % scale
    y, x = (h - sh) // 2, (w - sw) // 2
    return region[y:y + sh, x:x + sw]


def holdout_pairs(regions: list[np.ndarray], cfg: SRConfig, device="cpu") -> dict[str, list[tuple]]:
    """(low-resolution input, high-resolution target) pairs of the held-out regions, two ways:
    `clean` (area-downsampled: how a native crop looks) and `degraded` (the training degradation,
    seeded so every call and every run scores the same inputs)."""
    import cv2
    import torch

    from ..train.run import seed_everything
    from .degrade import Degrader

    s = cfg.net.scale
    degrader = Degrader(cfg.degradation, s, device)
    pairs: dict[str, list[tuple]] = {"clean": [], "degraded": []}
    for k, region in enumerate(regions):
        hr = _centre(region, cfg.data.val_size, s)
        if min(hr.shape) < MIN_PATCH:  # too small for the degradation's filters
            hr = np.pad(hr, ((0, max(0, MIN_PATCH - hr.shape[0])), (0, max(0, MIN_PATCH - hr.shape[1]))),
                        mode="reflect")
        pairs["clean"].append((cv2.resize(hr, (hr.shape[1] // s, hr.shape[0] // s), interpolation=cv2.INTER_AREA), hr))
        seed_everything(step_seed(cfg.train.seed + 1, k))
        lq = degrader(to_tensor(hr[None], device))[0].mean(0)
        pairs["degraded"].append((torch.round(lq * 255).clamp(0, 255).to(torch.uint8).cpu().numpy(), hr))
    return pairs


def quality(upscalers: dict, pairs: dict[str, list[tuple]], crop_border: int) -> dict:
    """{kind: {upscaler: {psnr, ssim}}}: the mean over held-out pairs (basicsr's metrics, 8-bit, border cropped)."""
    from .compat import install_functional_tensor_shim

    install_functional_tensor_shim()
    from basicsr.metrics.psnr_ssim import calculate_psnr, calculate_ssim

    out = {}
    for kind, items in pairs.items():
        out[kind] = {}
        for name, up in upscalers.items():
            ps, ss = [], []
            for lq, hr in items:
                sr = up(lq)
                ps.append(calculate_psnr(sr, hr, crop_border))
                ss.append(calculate_ssim(sr, hr, crop_border))
            out[kind][name] = {"psnr": round(float(np.mean(ps)), 3), "ssim": round(float(np.mean(ss)), 4)}
    return out


def quality_table(q: dict) -> str:
    """PSNR / SSIM of each upscaler on each kind of held-out input, one line each."""
    lines = []
    for kind, row in q.items():
        cells = ", ".join(f"{name} {v['psnr']:.2f} dB / {v['ssim']:.4f}" for name, v in row.items())
        lines.append(f"  {kind:<8} {cells}")
    return "\n".join(lines)
