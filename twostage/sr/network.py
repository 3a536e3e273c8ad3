"""The network train-sr trains, as a weights-folder entry: the upscaler name it is saved
under (a new name, never an official one), its spec and the generator built from the config."""
from __future__ import annotations

import os
import re

from ..errors import TwostageError
from . import weights
from .train_config import SRConfig
from .weights import WeightSpec

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str, weights_dir: str | os.PathLike | None, overwrite: bool) -> None:
    """A new upscaler name: a plain file stem, not bicubic, not a manifest (official) network,
    and not a network trained earlier unless `overwrite`."""
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


def network_spec(cfg: SRConfig, name: str) -> WeightSpec:
    """NAME.pth with cfg's architecture: the entry the result is registered as (sha256 and trained_on added then)."""
    return WeightSpec(name, f"{name}.pth", cfg.net.arch, cfg.net.scale, None, None, cfg.params())


def build_network(cfg: SRConfig, weights_dir: str | os.PathLike | None = None):
    """The generator: random-init (seeded), or net.init's verified weights when its shape matches."""
    import torch

    torch.manual_seed(cfg.train.seed)
    net = weights.build_model(network_spec(cfg, "train-sr"))
    if cfg.net.init:
        model, spec, _ = weights.load_model(cfg.net.init, weights_dir)
        if spec.arch != cfg.net.arch or spec.params != cfg.params() or spec.scale != cfg.net.scale:
            raise TwostageError(f"net.init={cfg.net.init}: a {spec.arch} x{spec.scale} {spec.params}; set net.arch, "
                                f"net.scale and the sizes to match (now {cfg.net.arch} x{cfg.net.scale} {cfg.params()})")
        net.load_state_dict(model.state_dict())
    return net

