"""The trainer: loss, LR schedule, validation, the setup of one run and the epoch loop.

Order matters for reproducibility: everything that draws from the global RNGs (model
init after `seed_everything`, then the restored RNG state on --resume) happens in the
same order on every run, so a resumed run gives the weights of the uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..box import crop_image, palm_input_warning
from ..checkpoint import save_checkpoint
from ..config import StageConfig
from ..data.fixes import Fixes, select_samples
from ..data.masks import MaskCache, load_masks
from ..devices import out_of_memory_as_error
from ..errors import TwostageError
from ..fusion import binarize, thresholds
from ..io.files import write_json_atomic
from ..io.images import png_size, read_image
from ..metrics import dice_per_class, summarize
from ..models import Predictor, SegmentationNet, build_model, input_hw, normalize
from ..sr.prepare import MANIFEST_DIR, load_palm_set
from .augment import make_batch
from .datasets import EpochSampler, GlobalDataset, PalmDataset, PalmItem, SeededSampler, StageDataset, collate, load_palm_items
from .distributed import Dist, broadcast, gather, has_unused_parameters, init_dist
from .inputs import default_cache_dir
from .run import (
    append_metrics,
    metrics_fields,
    open_run,
    prepare_run,
    rng_state,
    seed_everything,
    set_rng_state,
    stage_meta,
    tensorboard_writer,
)
from .split import load_or_create_split

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loss, schedule, head init

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


# --------------------------------------------------------------------------- validation

class _Validator:
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


# --------------------------------------------------------------------------- setup: data

def _data_roots(cfg: StageConfig) -> list[Path]:
    if not any(cfg.roots):
        raise TwostageError("data.root: not set (use --data DATA)")
    roots = [Path(r) for r in cfg.roots]
    for root in roots:
        if not root.is_dir():
            raise TwostageError(f"{root}: data folder does not exist")
    return roots


@dataclass
class _Source:
    """One data.root of a global run: its annotated images, sampling weight and, for a
    `twostage pseudo-label` folder, its record (which marks it as pseudo-labelled)."""

    root: Path
    weight: float
    samples: list
    pseudo: dict | None

    def ignored(self, sample) -> list[str]:
        """Classes of `sample` whose pseudo-label was dropped: not trained on, not background."""
        return list((self.pseudo or {}).get("dropped_classes", {}).get(sample.rel, []))

    def to_meta(self, used: int) -> dict:
        return {"root": str(self.root), "weight": self.weight, "images": used, "pseudo": self.pseudo is not None,
                **({"pseudo_source": self.pseudo.get("source")} if self.pseudo else {})}


def _sources(cfg: StageConfig, roots: list[Path], fixes) -> list[_Source]:
    from ..inference.pseudo import read_pseudo_record

    weights = cfg.data.source_weights or [1.0] * len(roots)
    sources = [_Source(r, float(w), _samples_with_masks(r, fixes), read_pseudo_record(r))
               for r, w in zip(roots, weights)]
    if len(sources) > 1 and cfg.data.fold >= 0 and all(s.pseudo for s in sources):
        raise TwostageError("data.root: every root is pseudo-labelled; validation needs a labelled one (or set "
                            "data.fold=-1)")
    return sources


def _samples_with_masks(root: Path, fixes) -> list:
    """The annotated images under `root`, less those the label fixes drop."""
    samples = [s for s in select_samples(root, None, fixes)[0] if s.json_path is not None]
    if not samples:
        raise TwostageError(f"{root}: no annotated images (train/outputs_json/*.json) to train on")
    return samples


def _palm_setup(cfg: StageConfig, root: Path, samples: list) -> tuple[list[PalmItem], dict]:
    """Palm items and the palm meta: the palm_set record and its box rule (which carries the
    fallback box and side range prepare-sr measured on the training boxes)."""
    record = load_palm_set(root)
    done = sum(1 for _ in (root / MANIFEST_DIR).rglob("*.json"))  # an item's manifest is written last
    if done < int(record.get("count", 0)):
        raise TwostageError(f"{root}: palm set incomplete ({done} of {record['count']} crops; prepare-sr was "
                            "interrupted or a shard is missing); re-run prepare-sr to finish it")
    items = load_palm_items(root, samples)
    warning = palm_input_warning([it.source_box.side for it in items], cfg.model.input_size)
    if warning:
        log.warning("palm training: %s", warning)
    return items, {"palm_set": record, "box_rule": record["box_rule"]}


def _fold_indices(cfg: StageConfig, run: Path, samples: list, dist: Dist,
                  split_ids: list[str] | None = None) -> tuple[list[int], list[int]]:
    """(train, validation) sample indices of fold data.fold (-1: no validation); rank 0 reads
    or writes the split file, the other ranks receive it. `split_ids` (one per image) are the
    IDs the folds are drawn over: a palm set's source images, so that the palm and global runs
    of one dataset (same folds and seed) hold out the same IDs even where some images have no
    carpal crop."""
    split_path = Path(cfg.data.split_file) if cfg.data.split_file else run / "split.json"
    if dist.main:
        ids = split_ids if split_ids else [s.id for s in samples]
        assign = load_or_create_split(split_path, ids, cfg.data.folds, cfg.train.seed)
    assign = broadcast(assign if dist.main else None, dist)
    is_val = [cfg.data.fold >= 0 and assign[s.id] == cfg.data.fold for s in samples]
    tr_idx = [i for i, v in enumerate(is_val) if not v]
    va_idx = [i for i, v in enumerate(is_val) if v]
    if not tr_idx:
        raise TwostageError(f"{split_path}: fold {cfg.data.fold} holds every image; nothing left to train on")
    return tr_idx, va_idx


MIN_WINDOW_SHARE = 0.4
"""A training window below this share of the image side (at data.patch_scale) warns: the 29
classes are told apart by where they lie (finger-1 vs finger-5), which a window that sees a
small part of the hand cannot tell (benchmarks/patch.py: a quarter of the side fails)."""


def _window_warning(cfg: StageConfig, samples: list) -> str | None:
    """A warning when data.patch windows see too little of the images, else None."""
    if cfg.data.patch is None or cfg.stage != "global" or not samples:
        return None
    side = float(np.median([min(png_size(s.image_path)) for s in samples[:64]])) * cfg.data.patch_scale
    share = cfg.data.patch / side
    if share >= MIN_WINDOW_SHARE:
        return None
    return (f"data.patch={cfg.data.patch} at data.patch_scale={cfg.data.patch_scale:g} covers {share:.0%} of the "
            f"image side ({side:.0f} px): too little context to tell the fingers apart; raise data.patch or lower "
            f"data.patch_scale (global-patch.yaml covers half the side)")


def stage_datasets(cfg: StageConfig, roots: list[Path], run: Path, dist: Dist,
              device: torch.device) -> tuple[StageDataset, _Validator, dict]:
    """The training dataset, the validator of the held-out fold and the stage's extra meta.

    With several data.root, the folds are drawn over the IDs of the labelled roots only and
    validation scores labelled images only; pseudo-labelled images train, except those of a
    validation ID (which would leak it)."""
    fixes = Fixes.load(cfg.data.fixes) if cfg.data.fixes else None
    cache = MaskCache(cfg.data.mask_cache or run / "mask-cache")
    sources = _sources(cfg, roots, fixes)
    if len(sources) == 1 and sources[0].pseudo is not None and cfg.data.fold >= 0 and dist.main:
        log.warning("%s is pseudo-labelled: validation scores pseudo-labels (list the labelled root too: "
                    "--data DATA %s)", roots[0], roots[0])
    pseudo_sources = [src for src in sources if src.pseudo is not None and len(sources) > 1]
    labelled = [(src, s) for src in sources if src not in pseudo_sources for s in src.samples]
    samples = [s for _, s in labelled]
    extra_meta: dict[str, Any] = {}
    palm_items = None
    if cfg.stage == "palm":
        palm_items, extra_meta = _palm_setup(cfg, roots[0], samples)
    warning = _window_warning(cfg, samples)
    if warning and dist.main:
        log.warning("training: %s", warning)
    tr_idx, va_idx = _fold_indices(cfg, run, samples, dist, extra_meta.get("palm_set", {}).get("split_ids"))
    val_ids = {samples[i].id for i in va_idx}
    train = [labelled[i] for i in tr_idx]
    pseudo = [(src, s) for src in pseudo_sources for s in src.samples]
    kept = [(src, s) for src, s in pseudo if s.id not in val_ids]
    if len(kept) < len(pseudo) and dist.main:
        log.warning("%d pseudo-labelled image(s) of validation IDs left out of training", len(pseudo) - len(kept))
    train += kept
    # which IDs trained this model: calibration uses only IDs that neither stage trained on
    extra_meta["train_ids"] = sorted({s.id for _, s in train})
    extra_meta["sources"] = [src.to_meta(sum(1 for t, _ in train if t is src)) for src in sources]
    (log.info if dist.main else log.debug)("%s stage: %d train / %d val images (fold %d), device %s, world %d%s",
             cfg.stage, len(train), len(va_idx), cfg.data.fold, device, dist.world,
             "" if len(sources) == 1 else "; sources " + ", ".join(
                 f"{m['root']} ({m['images']}{', pseudo' if m['pseudo'] else ''}, weight {m['weight']:g})"
                 for m in extra_meta["sources"]))
    val = [samples[i] for i in va_idx]
    if palm_items is not None:
        train_ds = PalmDataset(cfg, [palm_items[i] for i in tr_idx], fixes, augment=True, jitter=True)
        validator = _Validator(cfg, val, fixes, cache, [palm_items[i] for i in va_idx])
    else:
        train_ds = GlobalDataset(cfg, [s for _, s in train], fixes, augment=True,
                                 weights=[src.weight for src, _ in train], ignored=[src.ignored(s) for src, s in train])
        validator = _Validator(cfg, val, fixes, cache, None)
    _attach_cache(cfg, train_ds, dist)
    return train_ds, validator, extra_meta


def loader_workers(cfg: StageConfig) -> int:
    """train.workers as a count: `auto` is the cores of this process's share of the machine
    (torchrun's LOCAL_WORLD_SIZE processes split them) less one for the training loop itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if cfg.train.workers == "auto":
        return share - 1
    return min(int(cfg.train.workers), share)  # augmentation is seeded per item: same batches either way


def _attach_cache(cfg: StageConfig, train_ds: StageDataset, dist: Dist) -> None:
    """Open the training-input cache (data.cache), built first where missing: by local rank 0 of
    every node on all its cores while the other ranks wait, then opened by them."""
    root = Path(cfg.data.cache) if cfg.data.cache else default_cache_dir()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if dist.world == 1:
        train_ds.attach_cache(root, workers=cores)
        return
    if dist.local_rank == 0:
        train_ds.attach_cache(root, workers=cores)
    torch.distributed.barrier()
    if dist.local_rank != 0:
        train_ds.attach_cache(root, build=False)


# --------------------------------------------------------------------------- setup: model, optimiser

@dataclass
class Fit:
    """What the epochs train with: the model (and its DDP wrapper), the data order, the optimiser."""

    model: SegmentationNet
    net: nn.Module  # `model`, or its DistributedDataParallel wrapper
    device: torch.device
    sampler: Any  # SeededSampler or DistributedSampler (both have set_epoch)
    loader: torch.utils.data.DataLoader
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: bool
    channels_last: bool
    class_weights: torch.Tensor | None  # (C,) loss weights, or None: all classes alike
    updates: list[int] = field(default_factory=lambda: [0])  # optimiser steps taken (GradScaler skips some)

    def __post_init__(self) -> None:
        # counted by a hook, not by reading GradScaler's scale: that would wait for the GPU every step
        self.opt.register_step_post_hook(lambda *_: self.updates.__setitem__(0, self.updates[0] + 1))


@dataclass
class _Best:
    """The best epoch so far by `metric` (saved in last.pt, so a resumed run keeps it)."""

    metric: str
    value: float = -math.inf
    epoch: int | None = None


def _loader(cfg: StageConfig, train_ds: StageDataset, dist: Dist, cuda: bool):
    """(sampler, DataLoader) of the training set: this rank's share, in a seeded order per epoch."""
    if train_ds.weights is not None:  # several sources of unequal weight: drawn with replacement
        sampler = SeededSampler(len(train_ds), cfg.train.seed, train_ds.weights, dist.rank, dist.world)
    elif dist.world > 1:
        sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank,
                                                      shuffle=True, seed=cfg.train.seed)
    else:
        sampler = SeededSampler(len(train_ds), cfg.train.seed)
    sampler = EpochSampler(sampler)
    per_rank = math.ceil(len(train_ds) / dist.world)
    drop_last = per_rank > cfg.train.batch_size
    workers = loader_workers(cfg)
    if dist.main:
        log.info("%d DataLoader worker(s) (train.workers=%s)", workers, cfg.train.workers)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler,
                                         num_workers=workers, drop_last=drop_last, collate_fn=collate,
                                         pin_memory=cuda, persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers > 0 else None)
    return sampler, loader


def build_fit(cfg: StageConfig, train_ds: StageDataset, device: torch.device, dist: Dist) -> Fit:
    """Model (seeded init, head prior, DDP wrapper), loader, AdamW, warm-up + cosine schedule, AMP scaler."""
    model = build_model(cfg.model.arch, cfg.model.encoder, len(cfg.classes), cfg.model.in_channels,
                        encoder_weights=cfg.model.encoder_weights, **cfg.model.kwargs).to(device)
    if cfg.model.head_prior is not None:
        set_head_prior(model, cfg.model.head_prior)
    cuda = device.type == "cuda"
    if cuda:  # every training batch has the input size: cuDNN's autotuned kernels pay (+4..7 % per step)
        torch.backends.cudnn.benchmark = True
    channels_last = cuda and cfg.train.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                                  find_unused_parameters=has_unused_parameters(
                                                      model, cfg.model.in_channels, device))
    sampler, loader = _loader(cfg, train_ds, dist, cuda)
    steps_per_epoch = len(loader)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(
        cfg.train.epochs * steps_per_epoch, round(cfg.schedule.warmup_epochs * steps_per_epoch),
        cfg.schedule.min_lr_ratio))
    amp = cfg.train.amp and cuda
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    return Fit(model, net, device, sampler, loader, opt, sched, scaler, amp, channels_last, loss_weights(cfg))


def _restore(fit: Fit, last: dict, best: _Best) -> int:
    """Load last.pt's weights, optimiser, schedule, scaler, RNG state and best epoch; returns the epochs done."""
    fit.model.load_state_dict(last["state_dict"])
    fit.opt.load_state_dict(last["optimizer"])
    fit.sched.load_state_dict(last["scheduler"])
    fit.scaler.load_state_dict(last["scaler"])
    set_rng_state(last["rng"])
    best.value = float(last["best"]["value"])
    best.epoch = last["best"]["epoch"]
    return int(last["meta"]["epoch"])


# --------------------------------------------------------------------------- one epoch

NON_FINITE, SKIPPED, UPDATED = "non-finite loss", "skipped by GradScaler", "updated"
"""What one training step did."""


def train_step(cfg: StageConfig, fit: Fit, batch: dict, meta: dict, dist: Dist) -> tuple[torch.Tensor, str]:
    """One optimiser step on one batch; returns the loss and what the step did. A non-finite
    loss (on any rank) returns before the update, so the weights stay those of the last good
    step; with AMP, GradScaler skips an update whose gradients overflowed and lowers its scale."""
    device = fit.device
    b = make_batch(batch, input_hw(cfg.model.input_size if cfg.data.patch is None else cfg.data.patch), device)
    x = normalize(b.images, meta["normalization"]["mean"], meta["normalization"]["std"], cfg.model.in_channels)
    if fit.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fit.opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=fit.amp):
        logits = fit.net(x)
    batch_dice = cfg.data.patch is not None if cfg.loss.batch_dice is None else cfg.loss.batch_dice
    all_valid = bool(batch["valid"].all())  # the host copy: asking the device would wait for the forward
    loss = bce_dice_loss(logits, b.masks, cfg.loss.bce, cfg.loss.dice, fit.class_weights,
                         None if all_valid else b.valid, batch_dice)
    finite = torch.isfinite(loss.detach()).float()
    fit.scaler.scale(loss).backward()
    if dist.world > 1:  # every rank stops, or none: the gradients are all-reduced
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    # The one wait for the GPU per step, once forward and backward are queued (asked before
    # the backward it would leave the GPU idle while the backward is launched).
    if not finite.item():
        return loss, NON_FINITE
    if cfg.optim.grad_clip > 0:
        fit.scaler.unscale_(fit.opt)
        nn.utils.clip_grad_norm_(fit.model.parameters(), cfg.optim.grad_clip)
    updates = fit.updates[0]
    fit.scaler.step(fit.opt)
    fit.scaler.update()
    fit.sched.step()
    return loss, UPDATED if fit.updates[0] > updates else SKIPPED


def _last_good(run: Path, epoch: int) -> str:
    """The checkpoint a run stopped during `epoch` (0-based) can go back to."""
    return f"{run / 'last.pt'} (after epoch {epoch})" if epoch else "none (no epoch has finished)"


def train_epoch(cfg: StageConfig, fit: Fit, train_ds: StageDataset, meta: dict, epoch: int, dist: Dist,
                 run: Path) -> tuple[float, int]:
    """One pass over this rank's share of the training set; returns the mean loss over all ranks
    and the number of updates GradScaler skipped. Out of memory, or a non-finite loss, stops
    training with one error naming the epoch, the step and what to change."""
    from tqdm import tqdm

    train_ds.set_epoch(epoch)
    fit.sampler.set_epoch(epoch)
    fit.net.train()
    total, count, skipped, last = torch.zeros((), device=fit.device), 0, 0, None
    steps = len(fit.loader)
    where = f"epoch {epoch + 1}/{cfg.train.epochs}, step 1/{steps}"
    size = "x".join(map(str, input_hw(cfg.model.input_size)))
    bar = tqdm(fit.loader, desc=f"{cfg.stage} {epoch + 1}/{cfg.train.epochs}", unit="step",
               disable=None if dist.main else True, leave=False)
    # the loader too: a batch is made (resized, augmented) as it is fetched
    with out_of_memory_as_error(lambda: f"training ({where}: batches of {cfg.train.batch_size} at {size} on {fit.device})",
                                f"--batch-size (now {cfg.train.batch_size}) or --input-size (now {cfg.model.input_size})"):
        for step, batch in enumerate(bar, start=1):
            where = f"epoch {epoch + 1}/{cfg.train.epochs}, step {step}/{steps}"
            loss, did = train_step(cfg, fit, batch, meta, dist)
            if did == NON_FINITE:
                raise TwostageError(f"training stopped: non-finite loss ({loss.item()}) at {where}, before its "
                                    f"update; last good checkpoint: {_last_good(run, epoch)}. Lower optim.lr or "
                                    "check the data")
            skipped += did == SKIPPED
            total += loss.detach()
            shown, last = last, loss.detach()
            count += 1
            if shown is not None:  # the step before's loss: ready, so reading it does not wait for the GPU
                bar.set_postfix(loss=f"{shown.item():.4f}")
    if dist.world > 1:
        stats = torch.stack([total, torch.tensor(float(count), device=fit.device),
                             torch.tensor(float(skipped), device=fit.device)])
        torch.distributed.all_reduce(stats)
        total, count, skipped = stats[0], int(stats[1].item()), int(stats[2].item())
    return float(total.item()) / max(count, 1), skipped


def _report_columns(report, classes: Sequence[str]) -> dict[str, Any]:
    """The validation columns of a metrics.csv row."""
    return dict(overall=round(report.overall, 6),
                carpal_mean=None if report.carpal_mean is None else round(report.carpal_mean, 6),
                **{f"dice/{c}": round(float(v), 6) for c, v in zip(classes, report.per_class)})


def _save_epoch(cfg: StageConfig, run: Path, fit: Fit, meta: dict, row: dict, report, best: _Best,
                has_val: bool) -> bool:
    """Rank 0 after an epoch: best.pt (+ val.json) if the best metric improved (every epoch
    without validation images), last.pt, metrics.csv. Returns whether it improved."""
    done = row["epoch"]
    improved = False
    if report is not None:
        value = getattr(report, best.metric)
        value = -math.inf if value is None else float(value)
        improved = value > best.value
    elif not has_val:
        value, improved = float(done), True  # no validation: best = latest
    metrics = {k: v for k, v in row.items() if not k.startswith("dice/")}
    meta_now = {**meta, "epoch": done, "metrics": metrics}
    if improved:
        best.value, best.epoch = value, done
        save_checkpoint(run / "best.pt", fit.model.state_dict(), meta_now)
        if report is not None:
            write_json_atomic(run / "val.json", {"epoch": done, **report.to_dict()})
    save_checkpoint(run / "last.pt", fit.model.state_dict(), meta_now, extra={
        "optimizer": fit.opt.state_dict(), "scheduler": fit.sched.state_dict(),
        "scaler": fit.scaler.state_dict(), "rng": rng_state(),
        "best": {"metric": best.metric, "value": best.value, "epoch": best.epoch}})
    append_metrics(run / "metrics.csv", row, metrics_fields(cfg.classes))
    return improved


def _log_epoch(cfg: StageConfig, row: dict, train_loss: float, report, improved: bool, writer) -> None:
    """Rank 0 after an epoch: TensorBoard scalars and the one-line summary."""
    done = row["epoch"]
    if writer is not None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, done)
    msg = f"epoch {done}/{cfg.train.epochs}  loss {train_loss:.4f}  {row['seconds']:.1f}s"
    if row["skipped_steps"]:
        msg += f"  ({row['skipped_steps']} AMP step(s) skipped)"
    if report is not None:
        carpal = "-" if report.carpal_mean is None else f"{report.carpal_mean:.4f}"
        msg += f"  val overall {report.overall:.4f}  carpal {carpal}" + ("  *best" if improved else "")
    log.info(msg)


def _log_end(cfg: StageConfig, stop: int, report, best: _Best, skipped: int) -> None:
    if skipped:
        log.info("AMP: GradScaler skipped %d update(s) whose gradients overflowed (counted per epoch in "
                 "metrics.csv, skipped_steps)", skipped)
    if stop < cfg.train.epochs:
        log.info("stopped after epoch %d of %d (train.stop_at_epoch); continue with --resume", stop, cfg.train.epochs)
    if report is not None:
        log.info("validation Dice at epoch %d (best %s %.4f at epoch %s):\n%s",
                 stop, best.metric, best.value, best.epoch, report.table())


# --------------------------------------------------------------------------- the trainer

def train(cfg: StageConfig, resume: bool = False) -> Path:
    """Train one stage; returns the run folder (best.pt, last.pt, config.yaml, metrics.csv).

    Under torchrun every rank calls this; rank 0 writes the run folder.
    """
    dist, device = init_dist(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    roots = _data_roots(cfg)
    run, last = prepare_run(cfg, resume)
    open_run(cfg, run, last, dist)
    with out_of_memory_as_error(f"preparing the training input (at input size {cfg.model.input_size}, "
                                f"data.patch={cfg.data.patch}, data.preload={cfg.data.preload})",
                                "--input-size" + (", or set data.preload=false" if cfg.data.preload else "")):
        train_ds, validator, extra_meta = stage_datasets(cfg, roots, run, dist, device)
    seed_everything(cfg.train.seed)
    fit = build_fit(cfg, train_ds, device, dist)
    meta = stage_meta(cfg, extra_meta)
    best, start = _Best(cfg.best_metric), 0
    if last is not None:
        start = _restore(fit, last, best)
        log.info("resuming %s at epoch %d/%d", run, start + 1, cfg.train.epochs)

    writer = tensorboard_writer(run) if dist.main else None
    stop = cfg.train.epochs if cfg.train.stop_at_epoch is None else min(cfg.train.epochs, cfg.train.stop_at_epoch)
    report, skipped_total = None, 0
    for epoch in range(start, stop):
        t0 = time.time()
        train_loss, skipped = train_epoch(cfg, fit, train_ds, meta, epoch, dist, run)
        skipped_total += skipped
        done = epoch + 1
        row: dict[str, Any] = {"epoch": done, "lr": fit.opt.param_groups[0]["lr"], "train_loss": round(train_loss, 6),
                               "skipped_steps": skipped}
        epoch_report = None
        if validator.val and (done % cfg.train.val_every == 0 or done == stop):
            with out_of_memory_as_error(f"validation (epoch {done}, one image at a time on {device})",
                                        f"--input-size (now {cfg.model.input_size})"):
                epoch_report = report = summarize(validator(fit.model, meta, device, dist), cfg.classes)
            row.update(_report_columns(epoch_report, cfg.classes))
        row["seconds"] = round(time.time() - t0, 2)
        if dist.main:
            improved = _save_epoch(cfg, run, fit, meta, row, epoch_report, best, has_val=bool(validator.val))
            _log_epoch(cfg, row, train_loss, epoch_report, improved, writer)
        if dist.world > 1:
            torch.distributed.barrier()
    if writer is not None:
        writer.close()
    if dist.main:
        _log_end(cfg, stop, report, best, skipped_total)
    return run


def train_stage(stage: str | None = None, config: str | os.PathLike | None = None,
                overrides: Sequence[str] = (), resume: bool = False, **flags: Any) -> Path:
    """Resolve the config (stage YAML or `config` file, `key=value` overrides, flags) and train.

    The one call behind `twostage train`; flags are config.FLAG_KEYS shortcuts.
    """
    from ..config import load_config

    if stage is None and config is None:
        raise TwostageError("give --stage NAME (a file in stages/) or --config FILE")
    return train(load_config(stage, config, overrides, **flags), resume=resume)
