"""Which images train and validate: the data roots of a run (labelled and pseudo-labelled,
with their weights), the folds, the palm set's items, and the training-input cache attached
to the dataset."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..box import palm_input_warning
from ..config import StageConfig
from ..data.fixes import Fixes, select_samples
from ..data.masks import MaskCache
from ..data.palm_set import MANIFEST_DIR, load_palm_set
from ..devices import cpu_cores
from ..errors import TwostageError
from ..io.images import png_size
from .datasets import GlobalDataset, PalmDataset, PalmItem, StageDataset, load_palm_items
from .distributed import Dist, broadcast
from .inputs import default_cache_dir
from .split import load_or_create_split
from .validate import Validator

log = logging.getLogger(__name__)


def data_roots(cfg: StageConfig) -> list[Path]:
    if not any(cfg.roots):
        raise TwostageError("data.root: not set (use --data DATA)")
    roots = [Path(r) for r in cfg.roots]
    for root in roots:
        if not root.is_dir():
            raise TwostageError(f"{root}: data folder does not exist")
    return roots


@dataclass
class Source:
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


def run_sources(cfg: StageConfig, roots: list[Path], fixes) -> list[Source]:
    from ..data.pseudo_record import read_pseudo_record

    weights = cfg.data.source_weights or [1.0] * len(roots)
    sources = [Source(r, float(w), samples_with_masks(r, fixes), read_pseudo_record(r))
               for r, w in zip(roots, weights)]
    if len(sources) > 1 and cfg.data.fold >= 0 and all(s.pseudo for s in sources):
        raise TwostageError("data.root: every root is pseudo-labelled; validation needs a labelled one (or set "
                            "data.fold=-1)")
    return sources


def samples_with_masks(root: Path, fixes) -> list:
    """The annotated images under `root`, less those the label fixes drop."""
    samples = [s for s in select_samples(root, None, fixes)[0] if s.json_path is not None]
    if not samples:
        raise TwostageError(f"{root}: no annotated images (train/outputs_json/*.json) to train on")
    return samples


def palm_setup(cfg: StageConfig, root: Path, samples: list) -> tuple[list[PalmItem], dict]:
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


def fold_indices(cfg: StageConfig, run: Path, samples: list, dist: Dist,
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


def window_warning(cfg: StageConfig, samples: list) -> str | None:
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
              device: torch.device) -> tuple[StageDataset, Validator, dict]:
    """The training dataset, the validator of the held-out fold and the stage's extra meta.

    With several data.root, the folds are drawn over the IDs of the labelled roots only and
    validation scores labelled images only; pseudo-labelled images train, except those of a
    validation ID (which would leak it)."""
    fixes = Fixes.load(cfg.data.fixes) if cfg.data.fixes else None
    cache = MaskCache(cfg.data.mask_cache or run / "mask-cache")
    sources = run_sources(cfg, roots, fixes)
    if len(sources) == 1 and sources[0].pseudo is not None and cfg.data.fold >= 0 and dist.main:
        log.warning("%s is pseudo-labelled: validation scores pseudo-labels (list the labelled root too: "
                    "--data DATA %s)", roots[0], roots[0])
    pseudo_sources = [src for src in sources if src.pseudo is not None and len(sources) > 1]
    labelled = [(src, s) for src in sources if src not in pseudo_sources for s in src.samples]
    samples = [s for _, s in labelled]
    extra_meta: dict[str, Any] = {}
    palm_items = None
    if cfg.stage == "palm":
        palm_items, extra_meta = palm_setup(cfg, roots[0], samples)
    warning = window_warning(cfg, samples)
    if warning and dist.main:
        log.warning("training: %s", warning)
    tr_idx, va_idx = fold_indices(cfg, run, samples, dist, extra_meta.get("palm_set", {}).get("split_ids"))
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
        validator = Validator(cfg, val, fixes, cache, [palm_items[i] for i in va_idx])
    else:
        train_ds = GlobalDataset(cfg, [s for _, s in train], fixes, augment=True,
                                 weights=[src.weight for src, _ in train], ignored=[src.ignored(s) for src, s in train])
        validator = Validator(cfg, val, fixes, cache, None)
    attach_cache(cfg, train_ds, dist)
    return train_ds, validator, extra_meta


def attach_cache(cfg: StageConfig, train_ds: StageDataset, dist: Dist) -> None:
    """Open the training-input cache (data.cache), built first where missing: by local rank 0 of
    every node on all its cores while the other ranks wait, then opened by them."""
    root = Path(cfg.data.cache) if cfg.data.cache else default_cache_dir()
    cores = cpu_cores()
    if dist.world == 1:
        train_ds.attach_cache(root, workers=cores)
        return
    if dist.local_rank == 0:
        train_ds.attach_cache(root, workers=cores)
    torch.distributed.barrier()
    if dist.local_rank != 0:
        train_ds.attach_cache(root, build=False)
