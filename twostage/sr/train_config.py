"""The sr config of `twostage train-sr` (stages/sr.yaml, demo-sr.yaml): what it trains on,
which network, losses, optimiser and loop; checked whole before any work starts, so a bad key
fails in a second, not after the data is read."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..box import DEFAULT_MARGIN
from ..config import describe, merge, option, resolve
from ..errors import TwostageError
from .degrade import MIN_PATCH, DegradationConfig, check_degradation

SR_ARCHS = ("SRVGGNetCompact", "RRDBNet")


@dataclass
class SRDataConfig:
    root: str = option("", "dataset root (DATA/train/DCM/<ID>/*.png with DATA/train/outputs_json; its train "
                           "split): native-resolution radiographs with carpal annotations; the palm regions are "
                           "the targets")
    fixes: str | None = option(None, "label fixes YAML applied on read (dropped images are left out)")
    margin: float = option(DEFAULT_MARGIN, "palm box margin, as prepare-sr's --margin")
    context: float = option(1.5, "region = the palm box grown by this (prepare-sr's --context: the crop it upscales)")
    gt_size: int = option(128, f"high-resolution patch side (>= {MIN_PATCH}, a multiple of 8 and of the scale; "
                           "Real-ESRGAN 256)")
    holdout: int = option(2, "images (whole IDs) held out for PSNR/SSIM against bicubic")
    val_size: int = option(256, "side of the centre crop of each held-out region that is scored (0: the whole region)")


@dataclass
class SRNetConfig:
    arch: str = option("SRVGGNetCompact", "SRVGGNetCompact (fast, the realesr-general-x4v3 family) or RRDBNet "
                                      "(RealESRGAN_x4plus family)")
    scale: int = option(4, "upscaling factor (2 or 4 for RRDBNet)")
    num_feat: int = option(32, "feature channels (official files: 64)")
    num_conv: int = option(8, "SRVGGNetCompact: convolutions (realesr-general-x4v3: 32)")
    num_block: int = option(6, "RRDBNet: residual-in-residual blocks (RealESRGAN_x4plus: 23)")
    num_grow_ch: int = option(32, "RRDBNet: growth channels")
    init: str | None = option(None, "start from this weights-manifest network (same arch and sizes, e.g. "
                                "realesr-general-x4v3 with num_feat 64, num_conv 32) instead of random weights")


@dataclass
class SRLossConfig:
    l1: float = option(1.0, "weight of the L1 loss")
    gan: float = option(0.0, "weight of the GAN loss (0: off; Real-ESRGAN 0.1) with basicsr's U-Net discriminator")
    gt_usm: bool = option(False, "sharpen the targets first (Real-ESRGAN: true; sharper, less faithful to the image)")


@dataclass
class SROptimConfig:
    lr: float = option(5e-4, "Adam learning rate (Real-ESRGAN 2e-4, from a pretrained network)")
    min_lr_ratio: float = option(0.1, "cosine decay to lr * min_lr_ratio at the last step")
    ema_decay: float = option(0.999, "EMA of the weights (what is saved); warmed up as min(decay, (1+t)/(10+t))")
    d_lr: float = option(1e-4, "discriminator learning rate (with loss.gan)")
    d_feat: int = option(64, "discriminator feature channels (with loss.gan)")


@dataclass
class SRTrainConfig:
    steps: int = option(2000, "training steps")
    batch_size: int = option(16, "patches per step")
    seed: int = option(0, "seed of weights, holdout choice, patches and degradations")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    val_every: int = option(500, "score the held-out regions every k steps (and at the end)")
    save_every: int = option(200, "save the resumable state every k steps")
    stop_at_step: int | None = option(None, "stop (resumably) after this step, e.g. for time-limited jobs")
    out: str = option("", "run folder (empty: runs/sr-<name>)")


@dataclass
class SRConfig:
    stage: str = option("sr", "sr: a super-resolution config for `twostage train-sr`")
    data: SRDataConfig = field(default_factory=SRDataConfig, metadata={"help": "radiographs and patches"})
    net: SRNetConfig = field(default_factory=SRNetConfig, metadata={"help": "network"})
    degradation: DegradationConfig = field(default_factory=DegradationConfig,
                                           metadata={"help": "Real-ESRGAN degradation model (twostage.sr.degrade)"})
    loss: SRLossConfig = field(default_factory=SRLossConfig, metadata={"help": "losses"})
    optim: SROptimConfig = field(default_factory=SROptimConfig, metadata={"help": "optimiser"})
    train: SRTrainConfig = field(default_factory=SRTrainConfig, metadata={"help": "training loop"})

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)

    def params(self) -> dict:
        """The architecture's keyword arguments, as a manifest entry's `params`."""
        n = self.net
        if n.arch == "SRVGGNetCompact":
            return {"num_in_ch": 3, "num_out_ch": 3, "num_feat": n.num_feat, "num_conv": n.num_conv,
                    "upscale": n.scale, "act_type": "prelu"}
        return {"num_in_ch": 3, "num_out_ch": 3, "num_feat": n.num_feat, "num_block": n.num_block,
                "num_grow_ch": n.num_grow_ch, "scale": n.scale}


SR_FLAG_KEYS = {"data": "data.root", "steps": "train.steps", "device": "train.device", "seed": "train.seed",
                "batch_size": "train.batch_size", "run": "train.out", "threads": "train.threads"}
RUNTIME_KEYS = ("train.device", "train.threads", "train.val_every", "train.save_every", "train.stop_at_step",
                "train.out", "data.root")
"""Keys a resumed run may change: where and how it runs, not what it learns."""


def validate_sr(cfg: SRConfig) -> None:
    """Every key in range, so a bad config fails before the data is read."""
    if cfg.stage != "sr":
        raise TwostageError(f"stage={cfg.stage!r}: train-sr takes an sr config (stages/sr.yaml, demo-sr.yaml)")
    n, d, t = cfg.net, cfg.data, cfg.train
    if n.arch not in SR_ARCHS:
        raise TwostageError(f"net.arch={n.arch!r}: one of {', '.join(SR_ARCHS)}")
    if n.scale not in ((2, 4) if n.arch == "RRDBNet" else (1, 2, 3, 4, 8)):
        raise TwostageError(f"net.scale={n.scale}: {'2 or 4' if n.arch == 'RRDBNet' else '1, 2, 3, 4 or 8'} for {n.arch}")
    for k in ("num_feat", "num_conv", "num_block", "num_grow_ch"):
        if not 1 <= getattr(n, k) <= 512:
            raise TwostageError(f"net.{k}={getattr(n, k)}: from 1 to 512")
    if d.gt_size < MIN_PATCH or d.gt_size % 8 or d.gt_size % n.scale:
        raise TwostageError(f"data.gt_size={d.gt_size}: at least {MIN_PATCH}, a multiple of 8 and of net.scale")
    if d.holdout < 1:
        raise TwostageError(f"data.holdout={d.holdout}: hold out at least 1 image to score the network")
    if d.val_size < 0 or (d.val_size and d.val_size < 8 * n.scale):
        raise TwostageError(f"data.val_size={d.val_size}: 0 (whole region) or at least {8 * n.scale}")
    if not d.context >= 1 or not 0 <= d.margin <= 1:
        raise TwostageError(f"data.context={d.context} / data.margin={d.margin}: context >= 1, margin 0..1")
    for k in ("steps", "batch_size", "val_every", "save_every"):
        if getattr(t, k) < 1:
            raise TwostageError(f"train.{k}={getattr(t, k)}: at least 1")
    if t.threads < 0 or (t.stop_at_step is not None and t.stop_at_step < 1):
        raise TwostageError("train.threads must be >= 0 and train.stop_at_step >= 1 (or null)")
    o, lo = cfg.optim, cfg.loss
    if o.lr <= 0 or o.d_lr <= 0 or not 0 <= o.min_lr_ratio <= 1 or not 0 <= o.ema_decay < 1 or o.d_feat < 1:
        raise TwostageError("optim: lr and d_lr > 0, min_lr_ratio 0..1, ema_decay in [0, 1), d_feat >= 1")
    if lo.l1 < 0 or lo.gan < 0 or lo.l1 + lo.gan == 0:
        raise TwostageError(f"loss.l1={lo.l1}, loss.gan={lo.gan}: non-negative, not both 0")
    check_degradation(cfg.degradation)


def load_sr_config(stage: str | None = "sr", config_file: str | os.PathLike | None = None,
                   overrides: Sequence[str] = (), **flags: Any) -> SRConfig:
    """defaults -> stages/<stage>.yaml or `config_file` -> `key=value` overrides -> flags (SR_FLAG_KEYS)."""
    return resolve(SRConfig(), validate_sr, SR_FLAG_KEYS, stage, config_file, overrides, flags)


def describe_sr() -> str:
    """The sr config reference (`twostage train-sr --help-config`)."""
    return describe(SRConfig)



def sr_config_from_dict(mapping: dict, where: str) -> SRConfig:
    """An SRConfig from a saved (resolved) mapping: a run's config.yaml, checked against --resume."""
    cfg = merge(SRConfig(), mapping, where)
    validate_sr(cfg)
    return cfg
