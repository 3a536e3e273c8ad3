"""The one model factory and the one predictor: every stage builds its network with
`build_model` and turns images into probabilities with `Predictor`, in training
validation and in inference alike (one preprocessing path).

Networks are segmentation-models-pytorch models (any architecture `smp.create_model`
knows, any smp or `tu-` timm encoder; pretrained encoder weights are fetched by smp/timm
themselves into the Hugging Face or torch.hub cache, found by `pretrained.py`, see `build_model`). `SegmentationNet`
pads inputs to the encoder's stride and crops the logits back, so any input size works (smp
raises otherwise).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .devices import cudnn_autotune
from .errors import TwostageError
from .pretrained import (
    LITE0_ENCODERS,
    LITE0_WEIGHTS,
    encoder_weights_names,
    fetch_error,
    find_pretrained,
    load_encoder_file,
    load_lite0_weights,
)
from .window import DEFAULT_OVERLAP, Window, sliding_window

log = logging.getLogger(__name__)


class SegmentationNet(nn.Module):
    """An smp model that accepts any input size: pads (N, C, H, W) to the encoder stride
    with zeros (the normalised mean) and crops the (N, classes, H, W) logits back. While traced
    (ONNX export) it always pads, by an amount computed from the traced shape: a size-dependent
    branch would be frozen into the graph for the example's size."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        encoder = getattr(net, "encoder", None)
        self.stride = int(getattr(encoder, "output_stride", 32) or 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw or torch.jit.is_tracing():
            x = F.pad(x, (0, pw, 0, ph))
        return self.net(x)[..., :h, :w]


def build_model(arch: str, encoder: str, classes: int, in_channels: int = 3,
                encoder_weights: str | os.PathLike | None = None, **kwargs: Any) -> SegmentationNet:
    """Build any smp architecture with any smp/timm encoder, wrapped to accept any input size.

    Args:
        arch: smp architecture name (Unet, UnetPlusPlus, UPerNet, DeepLabV3Plus, FPN, ...).
        encoder: smp encoder name, or `tu-<timm name>`.
        classes: number of output channels (independent sigmoid channels).
        in_channels: input channels (the grey X-ray is replicated to this many).
        encoder_weights: None/"none" (random); a pretrained name the encoder offers
            (`encoder_weights_names`: `imagenet`, `ssl`, `advprop`, ... for smp encoders;
            `imagenet` = timm's default tag, or a timm tag, for `tu-` encoders), fetched by
            smp/timm through huggingface_hub (or torch.hub) into their usual caches;
            "imagenet-lite0" (the local Lite0 file); or a path to an encoder state dict.
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
    spec = find_pretrained(encoder, weights) if weights not in (None, LITE0_WEIGHTS) else None
    if weights not in (None, LITE0_WEIGHTS) and spec is None and not Path(weights).is_file():
        names = encoder_weights_names(encoder)
        if names is not None:  # an unknown encoder is reported by smp below
            offers = f"it offers {', '.join(names)}" if names else "it has no pretrained weights"
            raise TwostageError(f"model.encoder_weights={weights!r}: not a pretrained weights name of encoder "
                                f"{encoder} ({offers}) and not a file; or use none, {LITE0_WEIGHTS} "
                                f"(encoder {LITE0_ENCODERS[0]}) or a path to encoder weights")
    create = dict(encoder_name=encoder, encoder_weights=None)
    if spec is not None:
        create = dict(encoder_name=spec.smp_encoder, encoder_weights=spec.smp_weights)
    try:
        net = smp.create_model(archs[arch.lower()], in_channels=in_channels, classes=int(classes),
                               **create, **kwargs)
    except Exception as e:  # sorted below; anything else propagates
        fetch = fetch_error(e, encoder, weights, spec) if spec is not None else None
        if fetch is not None:
            raise fetch from e
        known = isinstance(e, (KeyError, ValueError, TypeError, RuntimeError))
        if not known and spec is None:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if spec is not None:  # e.g. a damaged file in the cache
            msg = (f"{msg if known else f'{type(e).__name__}: {msg}'} (encoder_weights={weights} "
                   f"from {spec.source}, cache {spec.cache_dir()})")
        raise TwostageError(f"model {arch}/{encoder}: {msg}") from None
    if weights == LITE0_WEIGHTS:
        if in_channels != 3:
            raise TwostageError(f"model.encoder_weights={LITE0_WEIGHTS} needs in_channels=3")
        load_lite0_weights(net.encoder.model)
    elif spec is not None:
        log.info("encoder %s: %s weights from %s (cache %s)", encoder, weights, spec.source, spec.cache_dir())
    elif weights is not None:
        load_encoder_file(net.encoder, Path(weights))
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
    # built on the host, sent without blocking: a blocking copy would wait for the queued GPU work
    m = torch.as_tensor(mean, dtype=x.dtype).to(x.device, non_blocking=True).view(1, -1, 1, 1)[:, :in_channels]
    s = torch.as_tensor(std, dtype=x.dtype).to(x.device, non_blocking=True).view(1, -1, 1, 1)[:, :in_channels]
    return (x - m) / s


@contextlib.contextmanager
def compile_errors(compiled: bool) -> Iterator[None]:
    """A network `torch.compile` cannot compile here (no C compiler, no Triton for this GPU) is
    one line that names the way out, not the compiler's traceback."""
    if not compiled:
        yield
        return
    from torch._dynamo.exc import BackendCompilerFailed, TritonUnavailableError

    try:
        yield
    except (BackendCompilerFailed, TritonUnavailableError) as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise TwostageError(f"--compile: torch.compile failed on this machine ({first[:200]}); "
                            "run without --compile") from None


def input_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    """`input_size` (an int for square, or [h, w]) as an (h, w) tuple."""
    if isinstance(input_size, int):
        return (input_size, input_size)
    h, w = input_size
    return (int(h), int(w))


class Predictor:
    """A trained stage ready to run: weights plus the metadata that says how to feed them.

    Build with `Predictor.from_checkpoint(path, device)`. Calls are pure (no per-call state).
    Attributes: `.model` (eval mode, on `.device`), `.meta` (checkpoint meta), `.classes`,
    `.window` (the `window.Window` of a patch-trained checkpoint, or None).
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
        self.window = Window.from_meta(meta)
        self.channels_last = self.compiled = False

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        expect_stage: str | None = None) -> "Predictor":
        """Rebuild the network from a checkpoint's meta and load its weights (weights_only)."""
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, map_location="cpu", expect_stage=expect_stage)
        meta = ckpt["meta"]
        m = meta["model"]

        def build() -> SegmentationNet:
            try:
                return build_model(m["arch"], m["encoder"], len(meta["classes"]), m["in_channels"],
                                   encoder_weights=None, **m.get("kwargs", {}))
            except TwostageError as e:
                raise TwostageError(f"{path}: {e}") from None

        # built on the meta device (nothing allocated, no random initialisation of weights that
        # are replaced at once): a meta describing a network other than its tensors (a damaged
        # or crafted file) fails before memory is spent on it, then the checkpoint's tensors
        # become the network's own
        with torch.device("meta"):
            model = build()
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} != \
                {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}:
            raise TwostageError(f"{path}: weights do not fit {m['arch']}/{m['encoder']} (the tensors' names or "
                                "shapes differ from the network its meta describes)")
        model.load_state_dict(ckpt["state_dict"], assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer the file does not hold
            model = build()
            model.load_state_dict(ckpt["state_dict"])
        return cls(model, meta, device)

    def tune(self, channels_last: bool | None = None, compile: bool = False) -> "Predictor":
        """Inference speed-ups, in place: channels-last memory (default: on CUDA, where
        tensor-core convolutions want it; on the CPU it would change the last bits of the
        results) and, opt-in, `torch.compile` (minutes of compilation before the first image)."""
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.channels_last = True
        if compile:
            self.model = torch.compile(self.model, dynamic=False)
            self.compiled = True
        return self

    def preprocess(self, images: torch.Tensor | Sequence[torch.Tensor],
                   size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, H, W) uint8 -> (B, in_channels, h, w) normalised input at `size` (default the
        model's input size). A list of (H_i, W_i) images of different sizes gives one batch:
        each is resized to `size` on its own."""
        if not isinstance(images, torch.Tensor):
            size = size or self.input_size
            return torch.cat([self.preprocess(im[None], size) for im in images])
        if images.ndim != 3:
            raise TwostageError(f"Predictor expects (B, H, W) uint8 images, got shape {tuple(images.shape)}")
        x = resize_images(images.to(self.device)[:, None].float(), size or self.input_size)
        return normalize(x, self.mean, self.std, self.in_channels)

    def _forward(self, x: torch.Tensor, tta: bool, fp16: bool) -> torch.Tensor:
        """float32 logits of a normalised input; `tta`: averaged with the horizontal flip's."""
        use_amp = fp16 and self.device.type == "cuda"
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with cudnn_autotune(self.device), compile_errors(self.compiled), \
                torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=use_amp):
            out = self.model(x).float()
            if tta:
                out = 0.5 * (out + self.model(x.flip(-1)).float().flip(-1))
        return out

    @torch.no_grad()
    def logits_at(self, images: torch.Tensor, tta: bool = False, fp16: bool = False) -> torch.Tensor:
        """(B, H, W) uint8 -> (B, C, h, w) float32 logits of the whole image at the model's input
        size (a whole-image model's single-scale forward).

        With `tta`, the logits of the image and its horizontal flip are averaged. `fp16`
        (autocast) applies on CUDA only; on other devices it is ignored.
        """
        return self._forward(self.preprocess(images), tta, fp16)

    def working_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """(h, w) of `native_probs` for images of `shape` (H, W): the input size of a whole-image
        model, the image resized by the window scale for a patch-trained one."""
        return self.window.working_shape(shape) if self.window is not None else self.input_size

    @torch.no_grad()
    def native_probs(self, images: torch.Tensor | Sequence[torch.Tensor], tta: bool = False, fp16: bool = False,
                     scales: Sequence[float] = (1.0,), overlap: float = DEFAULT_OVERLAP,
                     out_device: str | torch.device | None = None) -> torch.Tensor:
        """(B, H, W) uint8 -> (B, C, h, w) float32 sigmoid probabilities at `working_shape`.
        A whole-image model also takes a list of (H_i, W_i) images of any sizes (the palm
        crops of a batch): one forward for all of them.

        A whole-image model sees the image at its input size (times each of `scales`); a
        patch-trained one (checkpoint `window`) sees it resized by the window scale (times each
        of `scales`) through `window.sliding_window` with `overlap`, accumulated on
        `out_device` (default the model's device). Several scales: the probabilities, resized
        to `working_shape`, are averaged (multi-scale TTA; `tta` flips at every scale).
        """
        if not isinstance(images, torch.Tensor) and self.window is not None:
            raise TwostageError("a patch-trained model takes a (B, H, W) batch of equal-size images")
        out_size = self.working_shape(images[0].shape[-2:])
        total = None
        for s in scales:
            if self.window is None:
                size = self.input_size if s == 1.0 else tuple(max(1, round(v * s)) for v in self.input_size)
                p = torch.sigmoid(self._forward(self.preprocess(images, size), tta, fp16))
                if out_device is not None:
                    p = p.to(out_device)
            else:
                x = self.preprocess(images, self.window.working_shape(images.shape[-2:], s))
                p = sliding_window(x, lambda w: torch.sigmoid(self._forward(w, tta, fp16)), self.window.size,
                                   overlap, out_device=out_device)
            p = resize_images(p, out_size)
            total = p if total is None else total.add_(p)
        if total is None:
            raise TwostageError("--scales: give at least one scale")
        return total if len(scales) == 1 else total.div_(len(scales))

    @torch.no_grad()
    def probs(self, images: torch.Tensor, tta: bool = False, fp16: bool = False, **kw) -> torch.Tensor:
        """(B, H, W) uint8 on any device -> (B, C, H, W) float32 sigmoid probabilities at the
        input's own H, W (bilinear upsampling of `native_probs`; `kw` go to it)."""
        return resize_images(self.native_probs(images, tta=tta, fp16=fp16, **kw), tuple(images.shape[-2:]))
