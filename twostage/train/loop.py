"""The trainer: the model and optimiser of one run, resume, the epoch loop and its checkpoints.
What it optimises is `loss`, which images it trains and validates on `sources`, the
validation `validate`.

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

import torch
from torch import nn

from ..checkpoint import save_checkpoint
from ..config import StageConfig
from ..devices import cpu_cores, out_of_memory_as_error
from ..errors import TwostageError
from ..io.files import write_json_atomic
from ..metrics import summarize
from ..models import SegmentationNet, build_model, input_hw, normalize
from .augment import make_batch
from .datasets import EpochSampler, SeededSampler, StageDataset, collate
from .distributed import Dist, has_unused_parameters, init_dist
from .loss import bce_dice_loss, loss_weights, lr_lambda, set_head_prior
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
from .sources import data_roots, stage_datasets

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- setup: model, optimiser

def loader_workers(cfg: StageConfig) -> int:
    """train.workers as a count: `auto` is the cores of this process's share of the machine
    (torchrun's LOCAL_WORLD_SIZE processes split them) less one for the training loop itself."""
    cores = cpu_cores()
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if cfg.train.workers == "auto":
        return share - 1
    return min(int(cfg.train.workers), share)  # augmentation is seeded per item: same batches either way



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
    roots = data_roots(cfg)
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
