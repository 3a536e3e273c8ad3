"""train-sr's data: the palm regions of the training set (split by ID into training and
held-out images) and the random patches cut from them, drawn from the global numpy generator
that each step seeds, so a resumed run draws the patches the uninterrupted one does."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..box import DEFAULT_MARGIN
from ..errors import TwostageError
from .train_config import SRConfig


@dataclass
class Regions:
    """Native-resolution palm regions (uint8) of the training and the held-out images."""

    train: list[np.ndarray]
    holdout: list[np.ndarray]
    train_ids: list[str]
    holdout_ids: list[str]


def palm_regions(root: str | os.PathLike, margin: float = DEFAULT_MARGIN, context: float = 1.5,
                 fixes: str | os.PathLike | None = None) -> list[tuple[str, np.ndarray]]:
    """(ID, region) of every annotated training image with carpals: the palm box (prepare-sr's
    rule) grown by `context`, cut from the native-resolution image (uint8)."""
    from ..box import BoxRule, crop_image
    from ..io.images import read_image
    from .prepare import palm_items

    root = Path(root)
    if not str(root) or not root.is_dir():
        raise TwostageError(f"{root}: no such dataset folder (train-sr DATA)")
    items, _, _ = palm_items(root, BoxRule(margin=margin), fixes)
    return [(s.id, np.ascontiguousarray(crop_image(read_image(s.image_path), b.grown(context, shape))))
            for s, _, shape, b in items]


def load_regions(cfg: SRConfig) -> Regions:
    """The palm regions of cfg.data.root, split by ID (seeded) into training and holdout."""
    if not cfg.data.root:
        raise TwostageError("train-sr: no dataset (data.root)")
    regions = palm_regions(cfg.data.root, cfg.data.margin, cfg.data.context, cfg.data.fixes)
    ids = sorted({i for i, _ in regions})
    if len(ids) <= cfg.data.holdout:
        raise TwostageError(f"{cfg.data.root}: {len(ids)} image ID(s) with carpals; need more than data.holdout="
                            f"{cfg.data.holdout} to train and score")
    order = np.random.default_rng(cfg.train.seed).permutation(len(ids))
    held = {ids[i] for i in order[:cfg.data.holdout]}
    out = Regions([], [], [], [])
    for i, crop in regions:
        (out.holdout if i in held else out.train).append(crop)
        (out.holdout_ids if i in held else out.train_ids).append(i)
    return out


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step` of a run seeded `seed`: what makes a resumed run draw as an uninterrupted one."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, step & 0xFFFFFFFF]).generate_state(1)[0])


def sample_patches(regions: list[np.ndarray], n: int, size: int) -> np.ndarray:
    """(n, size, size) uint8 patches: a random region, position and horizontal flip each
    (global numpy generator); regions smaller than a patch are reflected out to it."""
    out = np.empty((n, size, size), np.uint8)
    for k in range(n):
        r = regions[np.random.randint(len(regions))]
        ph, pw = max(0, size - r.shape[0]), max(0, size - r.shape[1])
        if ph or pw:
            r = np.pad(r, ((0, ph), (0, pw)), mode="reflect" if min(r.shape) > 1 else "edge")
        y, x = np.random.randint(r.shape[0] - size + 1), np.random.randint(r.shape[1] - size + 1)
        p = r[y:y + size, x:x + size]
        out[k] = p[:, ::-1] if np.random.uniform() < 0.5 else p
    return out


def to_tensor(patches: np.ndarray, device):
    """(n, h, w) uint8 -> (n, 3, h, w) float in [0, 1]: the grey image on three channels, as RealESRGANer feeds it."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(patches)).to(device=device, dtype=torch.float32) / 255.0
    return x[:, None].expand(-1, 3, -1, -1).contiguous()
