"""Validation during training: per-class Dice of the held-out fold at the original
resolution, through the Predictor path that inference uses."""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from ..box import crop_image
from ..config import StageConfig
from ..data.masks import load_masks
from ..fusion import binarize, thresholds
from ..io.images import read_image
from ..metrics import dice_per_class
from ..models import Predictor
from .datasets import PalmItem
from .distributed import Dist, gather

log = logging.getLogger(__name__)


class Validator:
    """Per-class Dice at the original resolution through the shared Predictor path.

    Global: probabilities upsampled to the source image size. Palm: the un-jittered box cut
    from the context crop, scored at the crop's own resolution. Masks thresholded by the
    fusion rule at the default thresholds. Images are split across ranks.
    """

    def __init__(self, cfg: StageConfig, val: list, fixes, cache, palm_items: list[PalmItem] | None):
        self.cfg, self.val, self.fixes, self.cache, self.palm_items = cfg, val, fixes, cache, palm_items
        self.thresholds = thresholds(None, cfg.classes)

    def __call__(self, model: nn.Module, meta: dict, device: torch.device, dist: Dist) -> dict[str, np.ndarray]:
        predictor = Predictor(model, meta, device)
        out = {}
        try:
            for k in range(dist.rank, len(self.val), dist.world):
                if self.palm_items is not None:
                    item = self.palm_items[k]
                    s = item.sample
                    image = crop_image(read_image(s.image_path), item.box, item.scale)
                    gt = crop_image(load_masks(s, self.cfg.classes, self.fixes, self.cache), item.box, item.scale)
                else:
                    s = self.val[k]
                    image = read_image(s.image_path)
                    gt = load_masks(s, self.cfg.classes, self.fixes, self.cache)
                img = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
                pred = binarize(predictor.probs(img)[0], self.thresholds)
                out[s.rel] = dice_per_class(pred, torch.from_numpy(np.ascontiguousarray(gt)).to(device))
        finally:
            model.train()
        merged = {}
        for part in gather(out, dist):
            merged.update(part)
        return dict(sorted(merged.items()))
