"""What one training step optimises: BCE + soft Dice per class with the stage's class
weights, the warm-up + cosine LR schedule (also used by `train-sr`), and the head's prior init."""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import StageConfig
from ..models import SegmentationNet

log = logging.getLogger(__name__)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, w_bce: float, w_dice: float,
                  class_weights: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                  batch_dice: bool = False) -> torch.Tensor:
    """BCE + soft Dice over independent sigmoid channels; (B, C, H, W) logits and 0..1 targets.
    `class_weights` (C,): per-channel weights of both terms, normalised to mean 1. `valid`
    (B, C): 0 where an image's class has no label (a pseudo-label dropped for low confidence),
    which then teaches nothing, neither bone nor background. `batch_dice`: one Dice per class
    over the whole batch instead of per image: for windows, where most miss a given bone, the
    per-image Dice of an empty target teaches only "never predict it" (loss.batch_dice)."""
    logits = logits.float()
    loss = logits.new_zeros(())
    wc = None if class_weights is None else (class_weights / class_weights.mean()).to(logits.device)
    w = wc
    if w is not None or valid is not None:  # per-(image, class) weights of both terms
        b, c = logits.shape[:2]
        w = (w if w is not None else logits.new_ones(c))[None, :].expand(b, c)
        if valid is not None:
            valid = valid.to(logits.device, torch.float32)
            w = w * valid
        denom = valid.sum().clamp(min=1.0) if valid is not None else b * c
    if w_bce:
        if w is None:
            loss = loss + w_bce * F.binary_cross_entropy_with_logits(logits, target)
        else:
            per_item = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3))
            loss = loss + w_bce * (per_item * w).sum() / denom
    if w_dice:
        p = torch.sigmoid(logits).flatten(2)
        t = target.flatten(2)
        if batch_dice:
            if valid is not None:
                p, t = p * valid[..., None], t * valid[..., None]
            dice = (2 * (p * t).sum((0, 2)) + 1.0) / (p.sum((0, 2)) + t.sum((0, 2)) + 1.0)  # (C,)
            loss = loss + w_dice * ((1 - dice).mean() if wc is None else ((1 - dice) * wc).mean())
        else:
            dice = (2 * (p * t).sum(-1) + 1.0) / (p.sum(-1) + t.sum(-1) + 1.0)
            loss = loss + w_dice * ((1 - dice).mean() if w is None else ((1 - dice) * w).sum() / denom)
    return loss


def loss_weights(cfg: StageConfig) -> torch.Tensor | None:
    """(C,) per-class loss weights of `loss.class_weights` (1 where not given), or None."""
    if not cfg.loss.class_weights:
        return None
    return torch.tensor([float(cfg.loss.class_weights.get(c, 1.0)) for c in cfg.classes])


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to `min_ratio` at the last step."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def set_head_prior(model: SegmentationNet, prior: float) -> None:
    """Start every sigmoid channel at probability `prior` (bias = logit(prior)), the class-prior
    init of RetinaNet: bones cover a few % of the image, so training skips the first phase of
    pushing 0.5 everywhere down to background."""
    convs = [m for m in model.net.segmentation_head.modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[-1].bias is not None:
        with torch.no_grad():
            convs[-1].bias.fill_(math.log(prior / (1 - prior)))
