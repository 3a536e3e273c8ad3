"""`twostage train`: train one stage (global or palm) from a resolved StageConfig.

One code path for one CPU, one GPU and torchrun (DDP: DistributedSampler, rank-0 logging
and checkpoints, validation gathered from all ranks). Every random choice (data order,
augmentation, palm box jitter) is drawn from generators seeded by (seed, epoch, item), so a
resumed run reproduces the uninterrupted one. The run folder holds config.yaml, split.json
(unless data.split_file points elsewhere), metrics.csv, best.pt, last.pt and val.json.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .config import StageConfig, config_from_dict, read_config_yaml
from .errors import TwostageError
from .io import read_image, write_json_atomic, write_text_atomic
from .models import Predictor, SegmentationNet, build_model, default_normalization, input_hw, normalize, resize_images

log = logging.getLogger(__name__)

RUNTIME_KEYS = {"train.workers", "train.device", "train.threads", "train.stop_at_epoch"}
"""Config keys a resumed run may change (they do not affect the trained weights on one device)."""

SPLIT_FORMAT = "twostage-split-1"


# --------------------------------------------------------------------------- split

def make_split(ids: Sequence[str], folds: int, seed: int) -> dict[str, int]:
    """Assign each person ID to a fold (GroupKFold-like, deterministic): IDs in a seeded
    order, biggest groups first, each to the fold with the fewest images so far."""
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    order = sorted(counts)
    rng = np.random.default_rng(seed)
    order = [order[k] for k in rng.permutation(len(order))]
    order.sort(key=lambda i: -counts[i])  # stable: seeded order within equal sizes
    load = [0] * folds
    assign = {}
    for i in order:
        f = min(range(folds), key=lambda k: (load[k], k))
        assign[i] = f
        load[f] += counts[i]
    return dict(sorted(assign.items()))


def load_or_create_split(path: Path, ids: Sequence[str], folds: int, seed: int) -> dict[str, int]:
    """The split file at `path` (created on first use, then reused); every ID must be in it."""
    if path.is_file():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            assign = {str(k): int(v) for k, v in obj["folds"].items()}
            n = int(obj["n_folds"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TwostageError(f"{path}: not a readable split file ({e})") from None
        if n != folds:
            raise TwostageError(f"{path}: made for {n} folds, config data.folds={folds} "
                                "(use another data.split_file or the same folds)")
        missing = sorted(set(ids) - set(assign))
        if missing:
            raise TwostageError(f"{path}: IDs {missing[:5]} ({len(missing)} in all) are not in the split file; "
                                "delete it to re-create it or point data.split_file elsewhere")
        return assign
    assign = make_split(ids, folds, seed)
    write_json_atomic(path, {"format": SPLIT_FORMAT, "n_folds": folds, "seed": seed, "folds": assign})
    log.info("wrote split file %s (%d IDs, %d folds)", path, len(assign), folds)
    return assign


# --------------------------------------------------------------------------- data

def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one item in one epoch: independent of workers, ranks and resumes."""
    return np.random.default_rng([seed, epoch, index])


def build_augment(cfg: StageConfig):
    """The albumentations pipeline applied at input size to the uint8 image and masks (a list).

    Resizing to the input size and normalising are NOT here: they are the shared
    `models.resize_images` / `models.normalize` steps also used by `Predictor`.
    """
    import albumentations as A
    import cv2

    a = cfg.aug
    return A.Compose([
        A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=a.clahe),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=a.brightness),
        A.Affine(scale=(1 - a.scale, 1 + a.scale), translate_percent=(-a.shift, a.shift),
                 rotate=(-a.rotate, a.rotate), interpolation=cv2.INTER_LINEAR,
                 mask_interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, p=a.affine_p),
        A.HorizontalFlip(p=a.hflip),
    ])


def _to_input_size(image: np.ndarray, masks: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint8 image and (C, H, W) {0,1} masks -> input size, masks as soft uint8 0..255."""
    img = resize_images(torch.from_numpy(image)[None, None].float(), size)[0, 0]
    msk = resize_images(torch.from_numpy(masks)[None].float() * 255.0, size)[0]
    return (img.round().clamp(0, 255).to(torch.uint8).numpy(),
            msk.round().clamp(0, 255).to(torch.uint8).numpy())


class _StageDataset(torch.utils.data.Dataset):
    """Items are (image uint8 (h, w), masks float (C, h, w) in 0..1) at the input size."""

    def __init__(self, cfg: StageConfig, augment: bool):
        self.size = input_hw(cfg.model.input_size)
        self.seed = cfg.train.seed
        self.epoch = 0
        self.augment = build_augment(cfg) if augment else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _source(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = item_rng(self.seed, self.epoch, index)
        image, masks = self._source(index, rng)
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(2**31 - 1)))
            out = self.augment(image=image, masks=list(masks))
            image, masks = out["image"], np.stack(out["masks"])
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(masks).float().div_(255.0)


class GlobalDataset(_StageDataset):
    """Whole images at the input size (resized once, optionally preloaded)."""

    def __init__(self, cfg: StageConfig, samples: list, fixes, cache, augment: bool):
        super().__init__(cfg, augment)
        self.samples, self.classes, self.fixes, self.cache = samples, cfg.classes, fixes, cache
        self.preloaded = None
        if cfg.data.preload:
            self.preloaded = [self._load(i) for i in range(len(samples))]

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        from .data import load_masks

        s = self.samples[index]
        return _to_input_size(read_image(s.image_path), load_masks(s, self.classes, self.fixes, self.cache), self.size)

    def _source(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.preloaded[index] if self.preloaded is not None else self._load(index)


@dataclass
class PalmItem:
    """One palm training crop: the CONTEXT crop (upscaled) and the palm box inside it."""

    sample: Any  # data.Sample of the context crop in PALMDATA
    box: Any  # box.Box of the palm box relative to the context box, in source pixels
    context_side: int  # context box side in source pixels
    scale: int  # upscale factor of the crop
    source_box: Any  # palm box in source pixels
    source_shape: tuple[int, int]  # (H, W) of the source image


def load_palm_items(root: Path, samples: list) -> list[PalmItem]:
    """Pair every palm crop with its prepare-sr manifest (palm and context box in source pixels)."""
    from .box import Box
    from .prepare import read_item_manifest

    items = []
    for s in samples:
        m = read_item_manifest(root, s)
        try:
            box, ctx = Box.from_dict(m["box"]), Box.from_dict(m["context_box"])
            scale = int(m["scale"])
            shape = tuple(int(v) for v in m["image_shape"][-2:])
        except (KeyError, TypeError, ValueError) as e:
            raise TwostageError(f"{root}: bad manifest for palm crop {s.rel} ({e}); re-run prepare-sr") from None
        items.append(PalmItem(s, box.relative_to(ctx), ctx.side, scale, box, shape))
    return items


def cut_box(array: np.ndarray, box, scale: int) -> np.ndarray:
    """The region of source-pixel `box` (relative to the context box) in an upscaled context crop."""
    return array[..., box.y0 * scale:box.y1 * scale, box.x0 * scale:box.x1 * scale]


class PalmDataset(_StageDataset):
    """Palm crops: a (jittered) palm box cut from the upscaled context crop, at the input size."""

    def __init__(self, cfg: StageConfig, items: list[PalmItem], fixes, cache, augment: bool, jitter: bool):
        super().__init__(cfg, augment)
        self.items, self.classes, self.fixes, self.cache = items, cfg.classes, fixes, cache
        self.shift, self.scale = cfg.box.jitter_shift, cfg.box.jitter_scale
        self.jitter = jitter
        self.preloaded = [self._load(i) for i in range(len(items))] if cfg.data.preload else None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        from .data import load_masks

        s = self.items[index].sample
        return read_image(s.image_path), load_masks(s, self.classes, self.fixes, self.cache)

    def _source(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        from .box import jitter_box

        item = self.items[index]
        image, masks = self.preloaded[index] if self.preloaded is not None else self._load(index)
        box = item.box
        if self.jitter:
            box = jitter_box(box, rng, self.shift, self.scale, (item.context_side, item.context_side))
        return _to_input_size(cut_box(image, box, item.scale), cut_box(masks, box, item.scale), self.size)


# --------------------------------------------------------------------------- loss, schedule

def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, w_bce: float, w_dice: float) -> torch.Tensor:
    """BCE + soft Dice over independent sigmoid channels; (B, C, H, W) logits and 0..1 targets."""
    logits = logits.float()
    loss = logits.new_zeros(())
    if w_bce:
        loss = loss + w_bce * F.binary_cross_entropy_with_logits(logits, target)
    if w_dice:
        p = torch.sigmoid(logits).flatten(2)
        t = target.flatten(2)
        dice = (2 * (p * t).sum(-1) + 1.0) / (p.sum(-1) + t.sum(-1) + 1.0)
        loss = loss + w_dice * (1 - dice).mean()
    return loss


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to `min_ratio` at the last step."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


# --------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    """Process-group facts: rank 0 logs and writes; world > 1 means DDP."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device_pref: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if device_pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TwostageError(f"train.device={device_pref}: CUDA is not available on this machine")
        device = torch.device("cuda", dist.local_rank) if world > 1 else torch.device(device_pref)
        torch.cuda.set_device(device)
    else:
        try:
            device = torch.device(device_pref)
        except RuntimeError:
            raise TwostageError(f"train.device={device_pref!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def _gather(obj: Any, dist: Dist) -> list:
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any, dist: Dist) -> Any:
    if dist.world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- run folder

def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume_config(cfg: StageConfig, run: Path) -> None:
    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        raise TwostageError(f"{saved_path}: missing; cannot check that the resumed run uses the same config")
    saved = _flat(config_from_dict(read_config_yaml(saved_path), str(saved_path)).to_dict())
    now = _flat(cfg.to_dict())
    diff = sorted(k for k in now if k not in RUNTIME_KEYS and now[k] != saved.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff[:4])
        raise TwostageError(f"{run}: --resume with a changed config ({shown}); resume with the "
                            "saved config or start a new run (--out)")


def _prepare_run(cfg: StageConfig, resume: bool) -> tuple[Path, dict | None]:
    """Check the run folder against --resume; returns (run dir, last.pt contents or None)."""
    run = cfg.out_dir
    last = run / "last.pt"
    if resume:
        if not last.is_file():
            raise TwostageError(f"{last}: no checkpoint to resume from (run without --resume to start)")
        _check_resume_config(cfg, run)
        ckpt = load_checkpoint(last, expect_stage=cfg.stage)
        done = int(ckpt["meta"]["epoch"])
        if done >= cfg.train.epochs:
            raise TwostageError(f"{run}: run finished ({done}/{cfg.train.epochs} epochs); not extending it "
                                "(start a new run with --out to train longer)")
        return run, ckpt
    if last.is_file():
        raise TwostageError(f"{run}: holds a run already (last.pt); use --resume to continue it or "
                            "another --out")
    return run, None


# --------------------------------------------------------------------------- the trainer

def _samples_with_masks(root: Path, fixes) -> list:
    from .data import find_samples

    samples = find_samples(root)
    if fixes is not None:
        samples = [s for s in samples if not fixes.drops(s)]
    samples = [s for s in samples if s.json_path is not None]
    if not samples:
        raise TwostageError(f"{root}: no annotated images (train/outputs_json/*.json) to train on")
    return samples


def _palm_setup(cfg: StageConfig, root: Path, samples: list) -> tuple[list[PalmItem], dict]:
    """Palm items and the palm meta (palm_set record, box rule, fallback box, side range)."""
    try:
        from .prepare import MANIFEST_DIR, load_palm_set
    except ImportError:
        raise TwostageError("palm training needs twostage.prepare (prepare-sr), which is not installed") from None
    from .box import fallback_from_boxes, palm_input_warning, side_range_from_boxes

    record = load_palm_set(root)
    done = sum(1 for _ in (root / MANIFEST_DIR).rglob("*.json"))  # an item's manifest is written last
    if done < int(record.get("count", 0)):
        raise TwostageError(f"{root}: palm set incomplete ({done} of {record['count']} crops; prepare-sr was "
                            "interrupted or a shard is missing); re-run prepare-sr to finish it")
    items = load_palm_items(root, samples)
    boxes, shapes = [it.source_box for it in items], [it.source_shape for it in items]
    warning = palm_input_warning([b.side for b in boxes], cfg.model.input_size)
    if warning:
        log.warning("palm training: %s", warning)
    meta = {"palm_set": record, "box_rule": record["box_rule"],
            "fallback_box": list(fallback_from_boxes(boxes, shapes)),
            "side_range": list(side_range_from_boxes(boxes, shapes))}
    return items, meta


def _meta(cfg: StageConfig, extra: dict) -> dict:
    norm = default_normalization(cfg.model.encoder_weights, cfg.model.encoder)
    if cfg.model.mean is not None:
        norm["mean"] = list(cfg.model.mean)
    if cfg.model.std is not None:
        norm["std"] = list(cfg.model.std)
    return {
        "stage": cfg.stage,
        "classes": cfg.classes,
        "model": {"arch": cfg.model.arch, "encoder": cfg.model.encoder,
                  "in_channels": cfg.model.in_channels, "kwargs": dict(cfg.model.kwargs)},
        "input_size": list(input_hw(cfg.model.input_size)),
        "normalization": norm,
        "config": cfg.to_dict(),
        **extra,
    }


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def metrics_fields(classes: Sequence[str]) -> list[str]:
    """metrics.csv columns: the same every epoch (validation columns empty when not validated)."""
    return ["epoch", "lr", "train_loss", "overall", "carpal_mean", *(f"dice/{c}" for c in classes), "seconds"]


def _append_metrics(path: Path, row: dict, fields: list[str]) -> None:
    """Rewrite metrics.csv atomically: earlier epochs' rows plus `row` (a resumed run drops
    rows of epochs it redoes)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < int(row["epoch"])]
    rows.append({k: ("" if v is None else v) for k, v in row.items()})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


class _Validator:
    """Per-class Dice at the original resolution through the shared Predictor path.

    Global: probabilities upsampled to the source image size. Palm: the un-jittered box cut
    from the context crop, scored at the crop's own resolution. Images are split across ranks.
    """

    def __init__(self, cfg: StageConfig, val: list, fixes, cache, palm_items: list[PalmItem] | None):
        self.cfg, self.val, self.fixes, self.cache, self.palm_items = cfg, val, fixes, cache, palm_items

    def __call__(self, model: nn.Module, meta: dict, device: torch.device, dist: Dist) -> dict[str, np.ndarray]:
        from .data import load_masks
        from .metrics import dice_per_class

        predictor = Predictor(model, meta, device)
        out = {}
        try:
            for k in range(dist.rank, len(self.val), dist.world):
                if self.palm_items is not None:
                    item = self.palm_items[k]
                    s = item.sample
                    image = cut_box(read_image(s.image_path), item.box, item.scale)
                    gt = cut_box(load_masks(s, self.cfg.classes, self.fixes, self.cache), item.box, item.scale)
                else:
                    s = self.val[k]
                    image = read_image(s.image_path)
                    gt = load_masks(s, self.cfg.classes, self.fixes, self.cache)
                img = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
                pred = predictor.probs(img)[0] > 0.5
                out[s.rel] = dice_per_class(pred, torch.from_numpy(np.ascontiguousarray(gt)).to(device))
        finally:
            model.train()
        merged = {}
        for part in _gather(out, dist):
            merged.update(part)
        return dict(sorted(merged.items()))


def train(cfg: StageConfig, resume: bool = False) -> Path:
    """Train one stage; returns the run folder (best.pt, last.pt, config.yaml, metrics.csv).

    Under torchrun every rank calls this; rank 0 writes the run folder.
    """
    from tqdm import tqdm

    from .data import Fixes, MaskCache
    from .metrics import summarize

    dist, device = init_dist(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    root = Path(cfg.data.root) if cfg.data.root else None
    if root is None:
        raise TwostageError("data.root: not set (use --data DATA)")
    if not root.is_dir():
        raise TwostageError(f"{root}: data folder does not exist")
    run, last = _prepare_run(cfg, resume)
    if dist.world > 1:
        torch.distributed.barrier()
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
        if last is None:
            cfg.save(run / "config.yaml")

    fixes = Fixes.load(cfg.data.fixes) if cfg.data.fixes else None
    cache = MaskCache(cfg.data.mask_cache or run / "mask-cache")
    samples = _samples_with_masks(root, fixes)
    extra_meta: dict[str, Any] = {}
    palm_items = None
    if cfg.stage == "palm":
        palm_items, extra_meta = _palm_setup(cfg, root, samples)

    split_path = Path(cfg.data.split_file) if cfg.data.split_file else run / "split.json"
    if dist.main:
        assign = load_or_create_split(split_path, [s.id for s in samples], cfg.data.folds, cfg.train.seed)
    assign = _broadcast(assign if dist.main else None, dist)
    is_val = [cfg.data.fold >= 0 and assign[s.id] == cfg.data.fold for s in samples]
    tr_idx = [i for i, v in enumerate(is_val) if not v]
    va_idx = [i for i, v in enumerate(is_val) if v]
    if not tr_idx:
        raise TwostageError(f"{split_path}: fold {cfg.data.fold} holds every image; nothing left to train on")
    (log.info if dist.main else log.debug)("%s stage: %d train / %d val images (fold %d), device %s, world %d",
             cfg.stage, len(tr_idx), len(va_idx), cfg.data.fold, device, dist.world)

    if palm_items is not None:
        train_ds = PalmDataset(cfg, [palm_items[i] for i in tr_idx], fixes, cache, augment=True, jitter=True)
        validator = _Validator(cfg, [samples[i] for i in va_idx], fixes, cache, [palm_items[i] for i in va_idx])
    else:
        train_ds = GlobalDataset(cfg, [samples[i] for i in tr_idx], fixes, cache, augment=True)
        validator = _Validator(cfg, [samples[i] for i in va_idx], fixes, cache, None)

    _seed_everything(cfg.train.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, len(cfg.classes), cfg.model.in_channels,
                        encoder_weights=cfg.model.encoder_weights, **cfg.model.kwargs).to(device)
    if cfg.model.head_prior is not None:
        set_head_prior(model, cfg.model.head_prior)
    cuda = device.type == "cuda"
    if cuda and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                                  find_unused_parameters=_has_unused_parameters(
                                                      model, cfg.model.in_channels, device))

    if dist.world > 1:
        sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank,
                                                      shuffle=True, seed=cfg.train.seed)
    else:
        sampler = _SeededSampler(len(train_ds), cfg.train.seed)
    per_rank = math.ceil(len(train_ds) / dist.world)
    drop_last = per_rank > cfg.train.batch_size
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(cfg.train.workers, cores)  # augmentation is seeded per item: same batches either way
    if workers < cfg.train.workers and dist.main:
        log.info("train.workers=%d on %d CPU cores: using %d DataLoader workers", cfg.train.workers, cores, workers)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler,
                                         num_workers=workers, drop_last=drop_last,
                                         pin_memory=cuda, persistent_workers=False)
    steps_per_epoch = len(loader)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(
        cfg.train.epochs * steps_per_epoch, round(cfg.schedule.warmup_epochs * steps_per_epoch),
        cfg.schedule.min_lr_ratio))
    use_amp = cfg.train.amp and cuda
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    meta = _meta(cfg, extra_meta)
    metric_name = cfg.best_metric
    start, best, best_epoch = 0, -math.inf, None
    if last is not None:
        model.load_state_dict(last["state_dict"])
        opt.load_state_dict(last["optimizer"])
        sched.load_state_dict(last["scheduler"])
        scaler.load_state_dict(last["scaler"])
        _set_rng_state(last["rng"])
        start = int(last["meta"]["epoch"])
        best = float(last["best"]["value"])
        best_epoch = last["best"]["epoch"]
        log.info("resuming %s at epoch %d/%d", run, start + 1, cfg.train.epochs)

    writer = _tensorboard(run) if dist.main else None
    stop = cfg.train.epochs if cfg.train.stop_at_epoch is None else min(cfg.train.epochs, cfg.train.stop_at_epoch)
    report = None
    for epoch in range(start, stop):
        t0 = time.time()
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        net.train()
        total, count = torch.zeros((), device=device), 0
        bar = tqdm(loader, desc=f"{cfg.stage} {epoch + 1}/{cfg.train.epochs}", unit="step",
                   disable=None if dist.main else True, leave=False)
        for images, masks in bar:
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            x = normalize(images, meta["normalization"]["mean"], meta["normalization"]["std"],
                          cfg.model.in_channels)
            if cuda and cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = net(x)
            loss = bce_dice_loss(logits, masks, cfg.loss.bce, cfg.loss.dice)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.detach()
            count += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if dist.world > 1:
            stats = torch.stack([total, torch.tensor(float(count), device=device)])
            torch.distributed.all_reduce(stats)
            total, count = stats[0], int(stats[1].item())
        train_loss = float(total.item()) / max(count, 1)

        done = epoch + 1
        validate = bool(va_idx) and (done % cfg.train.val_every == 0 or done == stop)
        row: dict[str, Any] = {"epoch": done, "lr": opt.param_groups[0]["lr"], "train_loss": round(train_loss, 6)}
        epoch_report = None
        if validate:
            per_image = validator(model, meta, device, dist)
            epoch_report = summarize(per_image, cfg.classes)
            report = epoch_report
            row.update(overall=round(epoch_report.overall, 6),
                       carpal_mean=None if epoch_report.carpal_mean is None else round(epoch_report.carpal_mean, 6),
                       **{f"dice/{c}": round(float(v), 6) for c, v in zip(cfg.classes, epoch_report.per_class)})
        row["seconds"] = round(time.time() - t0, 2)
        if dist.main:
            improved = False
            if epoch_report is not None:
                value = getattr(epoch_report, metric_name)
                value = -math.inf if value is None else float(value)
                improved = value > best
            elif not va_idx:
                value, improved = float(done), True  # no validation: best = latest
            metrics = {k: v for k, v in row.items() if not k.startswith("dice/")}
            meta_now = {**meta, "epoch": done, "metrics": metrics}
            if improved:
                best, best_epoch = value, done
                save_checkpoint(run / "best.pt", model.state_dict(), meta_now)
                if epoch_report is not None:
                    write_json_atomic(run / "val.json", {"epoch": done, **epoch_report.to_dict()})
            save_checkpoint(run / "last.pt", model.state_dict(), meta_now, extra={
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "rng": _rng_state(),
                "best": {"metric": metric_name, "value": best, "epoch": best_epoch}})
            _append_metrics(run / "metrics.csv", row, metrics_fields(cfg.classes))
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, (int, float)):
                        writer.add_scalar(k, v, done)
            msg = f"epoch {done}/{cfg.train.epochs}  loss {train_loss:.4f}  {row['seconds']:.1f}s"
            if epoch_report is not None:
                carpal = "-" if epoch_report.carpal_mean is None else f"{epoch_report.carpal_mean:.4f}"
                msg += f"  val overall {epoch_report.overall:.4f}  carpal {carpal}" + ("  *best" if improved else "")
            log.info(msg)
        if dist.world > 1:
            torch.distributed.barrier()
    if writer is not None:
        writer.close()
    if dist.main:
        if stop < cfg.train.epochs:
            log.info("stopped after epoch %d of %d (train.stop_at_epoch); continue with --resume", stop, cfg.train.epochs)
        if report is not None:
            log.info("validation Dice at epoch %d (best %s %.4f at epoch %s):\n%s",
                     stop, metric_name, best, best_epoch, report.table())
    return run


def set_head_prior(model: SegmentationNet, prior: float) -> None:
    """Start every sigmoid channel at probability `prior` (bias = logit(prior)), the class-prior
    init of RetinaNet: bones cover a few % of the image, so training skips the first phase of
    pushing 0.5 everywhere down to background."""
    convs = [m for m in model.net.segmentation_head.modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[-1].bias is not None:
        with torch.no_grad():
            convs[-1].bias.fill_(math.log(prior / (1 - prior)))


def _has_unused_parameters(model: SegmentationNet, in_channels: int, device: torch.device) -> bool:
    """Whether some parameters get no gradient (smp keeps the deeper encoder stages when
    encoder_depth < 5); DDP must then be told. Probed in eval mode: BN statistics unchanged."""
    x = torch.zeros(2, in_channels, 2 * model.stride, 2 * model.stride, device=device)
    model.eval()
    model(x).float().sum().backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    model.train()
    return unused


class _SeededSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch): reproducible across resumes."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _tensorboard(run: Path):
    """A SummaryWriter in <run>/tb if TensorBoard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run / "tb"))


def train_stage(stage: str | None = None, config: str | os.PathLike | None = None,
                overrides: Sequence[str] = (), resume: bool = False, **flags: Any) -> Path:
    """Resolve the config (stage YAML or `config` file, `key=value` overrides, flags) and train.

    The one call behind `twostage train`; flags are config.FLAG_KEYS shortcuts.
    """
    from .config import load_config

    if stage is None and config is None:
        raise TwostageError("give --stage NAME (a file in stages/) or --config FILE")
    return train(load_config(stage, config, overrides, **flags), resume=resume)
