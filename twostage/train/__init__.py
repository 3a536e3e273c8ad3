"""`twostage train`: train one stage (global or palm) from a resolved StageConfig.

One code path for one CPU, one GPU and torchrun (DDP: DistributedSampler, rank-0 logging
and checkpoints, validation gathered from all ranks). Every random choice (data order,
augmentation, palm box jitter) is drawn from generators seeded by (seed, epoch, item), so a
resumed run reproduces the uninterrupted one. The run folder holds config.yaml, split.json
(unless data.split_file points elsewhere), metrics.csv, best.pt, last.pt and val.json.

Modules: `split` (the ID-grouped fold split), `inputs` (the training-input cache),
`datasets` (datasets and sampler), `augment` and `clahe` (batched augmentation on the device),
`distributed` (ranks and device), `run` (run folder, resume, meta, RNG state, metrics.csv),
`loop` (loss, schedule, validation and the trainer itself).
"""
from .augment import make_batch
from .datasets import GlobalDataset, PalmDataset, PalmItem, collate, item_rng, load_palm_items
from .distributed import Dist, init_dist
from .loop import bce_dice_loss, lr_lambda, set_head_prior, train, train_stage
from .run import RUNTIME_KEYS, metrics_fields
from .split import SPLIT_FORMAT, load_or_create_split, make_split

__all__ = ["GlobalDataset", "PalmDataset", "PalmItem", "collate", "item_rng", "load_palm_items", "make_batch",
           "Dist", "init_dist", "bce_dice_loss", "lr_lambda", "set_head_prior", "train", "train_stage",
           "RUNTIME_KEYS", "metrics_fields", "SPLIT_FORMAT", "load_or_create_split", "make_split"]
