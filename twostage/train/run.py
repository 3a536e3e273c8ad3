"""The run folder: --resume checks, the checkpoint meta, the RNG state saved in last.pt,
metrics.csv and the optional TensorBoard writer."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..config import StageConfig, config_from_dict, read_config_yaml
from ..errors import TwostageError
from ..io.files import make_dir, write_text_atomic
from ..models import input_hw
from ..pretrained import default_normalization
from .distributed import Dist

RUNTIME_KEYS = {"train.workers", "train.device", "train.threads", "train.stop_at_epoch"}
"""Config keys a resumed run may change (they do not affect the trained weights on one device)."""


# --------------------------------------------------------------------------- run folder, resume

def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(cfg: Any, run: Path, from_dict: Any, runtime_keys: Any, instead: str) -> None:
    """A resumed run's config (`cfg`, a config dataclass) must equal run/config.yaml (read with
    `from_dict(mapping, where)`) but for `runtime_keys`; `instead` says what to do otherwise."""
    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        raise TwostageError(f"{saved_path}: missing; cannot check that the resumed run uses the same config")
    saved = _flat(from_dict(read_config_yaml(saved_path), str(saved_path)).to_dict())
    now = _flat(cfg.to_dict())
    diff = sorted(k for k in now if k not in runtime_keys and now[k] != saved.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff[:4])
        raise TwostageError(f"{run}: --resume with a changed config ({shown}); resume with the "
                            f"saved config or {instead}")


def prepare_run(cfg: StageConfig, resume: bool) -> tuple[Path, dict | None]:
    """Check the run folder against --resume; returns (run dir, last.pt contents or None)."""
    run = cfg.out_dir
    last = run / "last.pt"
    if resume:
        if not last.is_file():
            raise TwostageError(f"{last}: no checkpoint to resume from (run without --resume to start)")
        check_resume_config(cfg, run, config_from_dict, RUNTIME_KEYS, "start a new run (--out)")
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


def open_run(cfg: StageConfig, run: Path, last: dict | None, dist: Dist) -> None:
    """Create the run folder (rank 0, after every rank checked it) and save config.yaml on a new run."""
    if dist.world > 1:
        torch.distributed.barrier()
    if dist.main:
        make_dir(run)
        if last is None:
            cfg.save(run / "config.yaml")


# --------------------------------------------------------------------------- checkpoint meta, RNG

def stage_meta(cfg: StageConfig, extra: dict) -> dict:
    """The checkpoint meta of a stage run: config, model spec, normalisation, plus `extra`."""
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
        "input_size": list(input_hw(cfg.model.input_size if cfg.data.patch is None else cfg.data.patch)),
        **({} if cfg.data.patch is None else
           {"window": {"size": [cfg.data.patch] * 2, "scale": cfg.data.patch_scale}}),
        "normalization": norm,
        "config": cfg.to_dict(),
        **extra,
    }


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- metrics.csv, TensorBoard

def metrics_fields(classes: Sequence[str]) -> list[str]:
    """metrics.csv columns: the same every epoch (validation columns empty when not validated)."""
    return ["epoch", "lr", "train_loss", "skipped_steps", "overall", "carpal_mean", *(f"dice/{c}" for c in classes), "seconds"]


def append_metrics(path: Path, row: dict, fields: list[str], key: str = "epoch") -> None:
    """Rewrite metrics.csv atomically: earlier rows (by `key`: epoch, or train-sr's step) plus
    `row` (a resumed run drops rows of the epochs or steps it redoes)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r[key]) < int(row[key])]
    rows.append({k: ("" if v is None else v) for k, v in row.items()})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def tensorboard_writer(run: Path):
    """A SummaryWriter in <run>/tb if TensorBoard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run / "tb"))
