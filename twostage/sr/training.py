"""`twostage train-sr`: a super-resolution network trained on the user's own radiographs.

The official Real-ESRGAN files learnt from photographs and are missing on air-gapped machines;
this trains one from the training set itself. Targets are native-resolution patches of each
image's palm region (the prepare-sr context crop: the region the network will upscale), inputs
the same patches through Real-ESRGAN's degradation model (`twostage.sr.degrade`). L1 loss, an
EMA of the weights (what is saved, as `params_ema`), optionally a GAN loss with basicsr's
U-Net discriminator. One loop for every device: Real-ESRGAN's own training pipeline is
hard-wired to CUDA (`.cuda()` in its model) and to its experiments/ layout, so it could be
neither the CPU path nor tested here (docs/DESIGN.md §4).

Every step seeds the global generators from (seed, step), so a resumed run draws exactly the
patches, kernels and noise the uninterrupted one does. The result is written like an official
file into the weights folder and registered in its trained.yaml (`twostage.sr.weights`) with its
sha256, the data it learnt from and its held-out PSNR/SSIM against bicubic, so every command
that takes an upscaler name takes it.
"""
from __future__ import annotations

import copy
import datetime
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..box import DEFAULT_MARGIN
from ..config import describe, merge, option, resolve
from ..errors import TwostageError
from .degrade import MIN_PATCH, DegradationConfig, check_degradation

log = logging.getLogger(__name__)

SR_ARCHS = ("SRVGGNetCompact", "RRDBNet")
STATE = "state.pt"
"""The run folder's resumable state (networks, EMA, optimisers, step)."""


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


# --------------------------------------------------------------------------- data


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


def _step_seed(seed: int, step: int) -> int:
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


# --------------------------------------------------------------------------- scoring


def _centre(region: np.ndarray, side: int, scale: int) -> np.ndarray:
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
        seed_everything(_step_seed(cfg.train.seed + 1, k))
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


# --------------------------------------------------------------------------- networks and state


def _spec(cfg: SRConfig, name: str):
    from .weights import WeightSpec

    return WeightSpec(name, f"{name}.pth", cfg.net.arch, cfg.net.scale, None, None, cfg.params())


def build_network(cfg: SRConfig, weights_dir: str | os.PathLike | None = None):
    """The generator: random-init (seeded), or net.init's verified weights when its shape matches."""
    import torch

    from . import weights

    torch.manual_seed(cfg.train.seed)
    net = weights.build_model(_spec(cfg, "train-sr"))
    if cfg.net.init:
        model, spec, _ = weights.load_model(cfg.net.init, weights_dir)
        if spec.arch != cfg.net.arch or spec.params != cfg.params() or spec.scale != cfg.net.scale:
            raise TwostageError(f"net.init={cfg.net.init}: a {spec.arch} x{spec.scale} {spec.params}; set net.arch, "
                                f"net.scale and the sizes to match (now {cfg.net.arch} x{cfg.net.scale} {cfg.params()})")
        net.load_state_dict(model.state_dict())
    return net


def _sr_config_from_dict(mapping: dict, where: str) -> SRConfig:
    cfg = merge(SRConfig(), mapping, where)
    validate_sr(cfg)
    return cfg


@dataclass
class SRResult:
    """What train-sr wrote and measured."""

    name: str
    path: Path | None
    sha256: str | None
    run: Path
    step: int
    quality: dict
    seconds: float

    @property
    def finished(self) -> bool:
        return self.path is not None


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str, weights_dir: str | os.PathLike | None, overwrite: bool) -> None:
    """A new upscaler name: a plain file stem, not bicubic, not a manifest (official) network,
    and not a network trained earlier unless `overwrite`."""
    from . import weights

    if not NAME_RE.fullmatch(name or "") or name.endswith(".pth"):
        raise TwostageError(f"--out {name!r}: an upscaler name of letters, digits, '_', '.', '-' "
                            "(it names NAME.pth in the weights folder)")
    if name == "bicubic":
        raise TwostageError("--out bicubic: that name is the built-in bicubic upscaler; choose another")
    specs, mpath = weights.all_specs(weights_dir)
    if name in specs and specs[name].trained_on is None:
        raise TwostageError(f"--out {name}: the manifest {mpath} names an official network so; choose another name")
    if name in specs and not overwrite:
        raise TwostageError(f"--out {name}: {weights.weights_dir(weights_dir) / weights.TRAINED_NAME} already has a "
                            f"network of that name (trained on {specs[name].trained_on.get('data')}); pass "
                            "--overwrite to replace it or choose another name")


def train_sr(name: str, cfg: SRConfig, weights_dir: str | os.PathLike | None = None, resume: bool = False,
             overwrite: bool = False) -> SRResult:
    """Train `cfg` and, when it reaches train.steps, write NAME.pth into the weights folder and register it.

    `resume` continues the run folder's state (same config but RUNTIME_KEYS); `overwrite`
    starts again over an earlier run folder and replaces a trained network of that name.
    """
    import dataclasses
    import shutil

    import torch
    import yaml
    from tqdm import tqdm

    from ..checkpoint import load_weights_only
    from ..devices import torch_device
    from ..io.files import atomic_path, make_dir, sha256_file, write_text_atomic
    from ..train.loop import lr_lambda
    from ..train.run import append_metrics, check_resume_config, seed_everything
    from . import weights
    from .degrade import Degrader

    t0 = time.perf_counter()
    check_name(name, weights_dir, overwrite or resume)
    run = Path(cfg.train.out) if cfg.train.out else Path("runs") / f"sr-{name}"
    state_path = run / STATE
    if resume:
        if not state_path.is_file():
            raise TwostageError(f"{state_path}: no train-sr run to resume (run without --resume to start)")
        check_resume_config(cfg, run, _sr_config_from_dict, RUNTIME_KEYS, "pass --overwrite to start again")
    elif run.is_dir() and any(run.iterdir()):
        if not state_path.is_file():  # never delete a folder train-sr did not make
            raise TwostageError(f"{run}: exists and is not a train-sr run folder (no {STATE}); choose another --run")
        if not overwrite:
            raise TwostageError(f"{run}: holds a train-sr run already; --resume to continue it, --overwrite to "
                                "start again, or another --run")
        shutil.rmtree(run)
    dev = torch_device(cfg.train.device, "train.device", allow_auto=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    regions = load_regions(cfg)
    log.info("train-sr: %d training region(s) of %d ID(s), %d held out; %s x%d %s on %s", len(regions.train),
             len(set(regions.train_ids)), len(regions.holdout), cfg.net.arch, cfg.net.scale, cfg.params(), dev)

    net = build_network(cfg, weights_dir).to(dev).train()
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.99))
    lr_at = lr_lambda(cfg.train.steps, 0, cfg.optim.min_lr_ratio)
    disc = _Discriminator(cfg, dev) if cfg.loss.gan > 0 else None
    degrader = Degrader(cfg.degradation, cfg.net.scale, dev)  # installs the basicsr import shim
    if cfg.loss.gt_usm:
        from basicsr.utils import USMSharp

        usm = USMSharp().to(dev)  # Real-ESRGAN's sharpened targets
    pairs = holdout_pairs(regions.holdout, cfg, dev)
    bicubic = _bicubic(cfg.net.scale)

    step = 0
    if resume:
        state = load_weights_only(state_path, "train-sr state", map_location=dev)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optim"])
        if disc is not None:
            disc.load(state)
        step = int(state["step"])
        log.info("train-sr: resuming %s at step %d/%d", run, step, cfg.train.steps)
    else:
        make_dir(run)
        write_text_atomic(run / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False,
                                                              default_flow_style=None))

    def save() -> None:
        state = {"step": step, "net": net.state_dict(), "ema": ema.state_dict(), "optim": opt.state_dict(),
                 **(disc.state() if disc is not None else {})}
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)

    if not resume:
        save()  # from now on the folder is recognisably a train-sr run

    stop = min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps)
    last_q: dict = {}
    bar = tqdm(total=stop, initial=step, desc=f"train-sr {name}", unit="step", disable=None)
    interrupted = _StepBoundaryInterrupt()
    first, t_first = step, time.perf_counter()
    try:
        while step < stop:
            seed_everything(_step_seed(cfg.train.seed, step))
            gt = to_tensor(sample_patches(regions.train, cfg.train.batch_size, cfg.data.gt_size), dev)
            if cfg.loss.gt_usm:
                gt = usm(gt)
            lq = degrader(gt)
            out = net(lq)
            loss = cfg.loss.l1 * torch.nn.functional.l1_loss(out, gt)
            if disc is not None:
                loss = loss + disc.generator_loss(out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = cfg.optim.lr * lr_at(step)
            opt.step()
            if disc is not None:
                disc.step(out.detach(), gt)
            step += 1
            decay = min(cfg.optim.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), net.parameters()):
                    e.lerp_(p, 1 - decay)
                for e, b in zip(ema.buffers(), net.buffers()):
                    e.copy_(b)
            bar.update(1)
            bar.set_postfix(l1=f"{loss.item():.4f}")
            if step == first + PACE_STEPS:
                _log_pace((time.perf_counter() - t_first) / PACE_STEPS, cfg.train.steps - step, dev)
            if step % cfg.train.save_every == 0 or step == stop:
                save()
            if step % cfg.train.val_every == 0 or step == cfg.train.steps:
                last_q = quality({"network": _live(ema, cfg.net.scale, dev), "bicubic": bicubic}, pairs, cfg.net.scale)
                log.info("train-sr step %d: held-out PSNR/SSIM\n%s", step, quality_table(last_q))
                append_metrics(run / "metrics.csv", _metrics_row(step, loss.item(), last_q), METRICS_FIELDS,
                                key="step")
            if interrupted:
                save()
                log.warning("train-sr: interrupted after step %d; state saved, continue with --resume", step)
                raise KeyboardInterrupt
    finally:
        interrupted.restore()
        bar.close()
    if step < cfg.train.steps:
        log.info("train-sr: stopped at step %d/%d (train.stop_at_step); continue with --resume", step,
                 cfg.train.steps)
        return SRResult(name, None, None, run, step, last_q, time.perf_counter() - t0)

    directory = weights.weights_dir(weights_dir)
    spec = _spec(cfg, name)
    path = directory / spec.file
    with atomic_path(path) as tmp:
        torch.save({"params_ema": {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}}, tmp)
    sha = sha256_file(path)
    trained_on = {"data": str(Path(cfg.data.root).resolve()), "images": len(regions.train),
                  "holdout_ids": regions.holdout_ids, "steps": step, "seed": cfg.train.seed,
                  "run": str(run.resolve()), "degradation": "Real-ESRGAN second-order (twostage.sr.degrade)",
                  "quality": last_q,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    weights.register_trained(dataclasses.replace(spec, sha256=sha, trained_on=trained_on), weights_dir)
    log.info("train-sr: wrote %s (sha256 %s), registered as %r in %s", path, sha, name,
             directory / weights.TRAINED_NAME)
    return SRResult(name, path, sha, run, step, last_q, time.perf_counter() - t0)


PACE_STEPS = 10
"""After this many steps train-sr logs its pace and the time left (tqdm's ETA is not shown in logs)."""


def _log_pace(seconds_per_step: float, left: int, dev) -> None:
    hint = " (stages/demo-sr.yaml is sized for a CPU)" if dev.type == "cpu" and seconds_per_step * left > 3600 else ""
    log.info("train-sr: %.2f s per step on %s: about %s for the %d steps left%s", seconds_per_step, dev,
             elapsed(seconds_per_step * left), left, hint)


class _StepBoundaryInterrupt:
    """Ctrl-C ends the run after the current step, so the saved state is one the uninterrupted
    run passes through; a second Ctrl-C stops at once (the last periodic state stays)."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("train-sr: Ctrl-C: stopping after this step (again to stop at once)")

    def __bool__(self) -> bool:
        return self.requested

    def restore(self) -> None:
        if self._old is not None:
            import signal

            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _live(model, scale: int, dev):
    """An Upscaler around a copy of an in-memory network (scored exactly as a loaded file would be)."""
    from .upscale import network_upscaler

    return network_upscaler(copy.deepcopy(model).eval(), "live", scale, None, device=str(dev))


def _bicubic(scale: int):
    from .upscale import make_upscaler

    return make_upscaler("bicubic", scale=scale)


METRICS_FIELDS = ["step", "l1"] + [f"{kind}_{name}_{m}" for kind in ("clean", "degraded")
                                    for name in ("network", "bicubic") for m in ("psnr", "ssim")]
"""Columns of a train-sr run's metrics.csv: the loss and the held-out scores (`quality`)."""


def _metrics_row(step: int, loss: float, q: dict) -> dict:
    row = {"step": step, "l1": round(loss, 6)}
    for kind, scores in q.items():
        for name, v in scores.items():
            row[f"{kind}_{name}_psnr"], row[f"{kind}_{name}_ssim"] = v["psnr"], v["ssim"]
    return row


class _Discriminator:
    """Real-ESRGAN's adversarial part: basicsr's U-Net discriminator with spectral norm and its GAN loss."""

    def __init__(self, cfg: SRConfig, dev):
        import torch
        from basicsr.archs.discriminator_arch import UNetDiscriminatorSN
        from basicsr.losses.gan_loss import GANLoss

        self.net = UNetDiscriminatorSN(3, num_feat=cfg.optim.d_feat, skip_connection=True).to(dev).train()
        self.loss = GANLoss("vanilla", real_label_val=1.0, fake_label_val=0.0, loss_weight=cfg.loss.gan).to(dev)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.optim.d_lr, betas=(0.9, 0.99))

    def generator_loss(self, out):
        for p in self.net.parameters():
            p.requires_grad_(False)
        loss = self.loss(self.net(out), True, is_disc=False)
        for p in self.net.parameters():
            p.requires_grad_(True)
        return loss

    def step(self, fake, real) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.net(real), True, is_disc=True) + self.loss(self.net(fake), False, is_disc=True)
        loss.backward()
        self.opt.step()

    def state(self) -> dict:
        return {"net_d": self.net.state_dict(), "optim_d": self.opt.state_dict()}

    def load(self, state: dict) -> None:
        if "net_d" not in state:
            raise TwostageError("train-sr state: saved without the discriminator (loss.gan was 0)")
        self.net.load_state_dict(state["net_d"])
        self.opt.load_state_dict(state["optim_d"])


def elapsed(seconds: float) -> str:
    """A duration as s, min or h."""
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{math.ceil(seconds)} s"
