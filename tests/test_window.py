"""Sliding-window inference, multi-scale TTA and patch training (twostage/window.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from twostage.config import load_config
from twostage.errors import TwostageError
from twostage.models import Predictor
from twostage.window import Window, check_overlap, gaussian_map, parse_scales, sliding_window, window_starts


@pytest.fixture(scope="module")
def data(make_phantoms):
    return make_phantoms("win", n=8, size=128, seed=11)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("shape", [(200, 170), (64, 300), (97, 97)])
def test_constant_predictor_gives_a_constant_map(overlap, shape):
    """Gaussian blending has no seams: the weights are normalised at every pixel."""
    x = torch.zeros(2, 1, *shape)
    out = sliding_window(x, lambda w: torch.full((w.shape[0], 3, *w.shape[-2:]), 0.37), (64, 64), overlap, batch=3)
    assert out.shape == (2, 3, *shape)
    assert torch.allclose(out, torch.full_like(out, 0.37), atol=1e-6)


def test_a_position_consistent_predictor_is_reproduced_exactly():
    """Windows that agree where they overlap blend to that agreement (here: the input itself)."""
    x = torch.rand(1, 2, 150, 211, generator=torch.Generator().manual_seed(0))
    out = sliding_window(x, lambda w: w * 1.0, (48, 64), 0.5, out_device="cpu")
    assert torch.allclose(out, x, atol=1e-5)


@pytest.mark.parametrize("n,side,overlap,starts", [
    (100, 100, 0.5, [0]), (80, 100, 0.5, [0]), (200, 100, 0.5, [0, 50, 100]), (210, 100, 0.5, [0, 50, 100, 110]),
    (200, 100, 0.0, [0, 100]), (201, 100, 0.0, [0, 100, 101]), (10, 4, 0.75, list(range(7)))])
def test_window_starts_cover_the_axis_with_the_last_window_flush(n, side, overlap, starts):
    assert window_starts(n, side, overlap) == starts


def test_overlaps_are_blended_by_gaussian_importance():
    """Two windows over 96 columns, each predicting its own constant: every pixel is the
    Gaussian-weighted mean of the windows covering it, so a pixel nearer one window's centre
    leans to that window (uniform averaging would give 0.5 throughout the overlap)."""
    seen = []

    def predict(w):
        seen.append(len(seen))
        return torch.full((w.shape[0], 1, *w.shape[-2:]), float(seen[-1]))

    out = sliding_window(torch.zeros(1, 1, 64, 96), predict, (64, 64), 0.5, batch=1)[0, 0]
    g = gaussian_map((64, 64), "cpu")[0, 0, 32]  # the middle row of the importance map
    first, second = torch.zeros(96), torch.zeros(96)
    first[:64], second[32:] = g, g
    expected = second / (first + second)  # window 0 predicts 0, window 1 predicts 1
    assert torch.allclose(out[32], expected, atol=1e-5)
    assert float(out[32, 40]) < 0.2 < 0.8 < float(out[32, 55])
    band = out[16:48]  # away from the top and bottom rows, where the 1e-6 floor of the map takes over
    assert torch.allclose(band, out[32].expand_as(band), atol=1e-5)  # a column's weights do not depend on the row


def test_a_predictor_returning_another_shape_is_refused():
    with pytest.raises(TwostageError, match="sliding window: the predictor"):
        sliding_window(torch.zeros(1, 1, 64, 64), lambda w: w[..., ::2, ::2], (32, 32))


def test_gaussian_map_is_centred_and_positive():
    g = gaussian_map((64, 48), "cpu")[0, 0]
    assert g.shape == (64, 48) and float(g.min()) > 0
    assert torch.allclose(g, g.flip(0)) and torch.allclose(g, g.flip(1))
    assert float(g.max()) == pytest.approx(1.0, abs=1e-2)  # even sides: the centre falls between pixels


def _pair(make_tiny_checkpoint, tmp_path, size, scale=1.0):
    whole = make_tiny_checkpoint(tmp_path / "whole.pt", "global", input_size=size)
    patch = make_tiny_checkpoint(tmp_path / "patch.pt", "global", input_size=size,
                                 window={"size": [size, size], "scale": scale})
    return Predictor.from_checkpoint(whole), Predictor.from_checkpoint(patch)


@pytest.mark.parametrize("image", [64, 48])
def test_window_covering_the_image_equals_the_whole_image_output(make_tiny_checkpoint, tmp_path, image):
    """A window at least the image's size (64 = the image; 64 > 48: clamped to the image) is the
    whole-image forward: the patch path and the whole-image path give the same probabilities."""
    whole, patch = _pair(make_tiny_checkpoint, tmp_path, 64)
    img = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, image, image), dtype=np.uint8))
    ref = torch.sigmoid(whole.model(whole.preprocess(img, (image, image)))).detach()
    got = patch.native_probs(img)
    assert got.shape == ref.shape == (2, 29, image, image)
    assert torch.allclose(got, ref, atol=1e-5)
    if image == 64:  # and equals the whole-image model at its input size, also with hflip
        assert torch.allclose(got, whole.native_probs(img), atol=1e-5)
        assert torch.allclose(patch.native_probs(img, tta=True), whole.native_probs(img, tta=True), atol=1e-5)


def test_patch_checkpoint_predicts_at_the_working_size(make_tiny_checkpoint, tmp_path):
    _, patch = _pair(make_tiny_checkpoint, tmp_path, 32, scale=0.5)
    img = torch.zeros(1, 100, 150, dtype=torch.uint8)
    assert patch.working_shape((100, 150)) == (50, 75)
    assert patch.native_probs(img).shape == (1, 29, 50, 75)
    assert patch.native_probs(img, out_device="cpu").device.type == "cpu"


def test_multi_scale_averages_the_scales(make_tiny_checkpoint, tmp_path):
    whole, patch = _pair(make_tiny_checkpoint, tmp_path, 64)
    img = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 128, 128), dtype=np.uint8))
    for p in (whole, patch):
        one = {s: p.native_probs(img, scales=(s,)) for s in (0.75, 1.0, 1.25)}
        assert all(v.shape == one[1.0].shape for v in one.values())  # every scale back at the working size
        mean = sum(one.values()) / 3
        assert torch.allclose(p.native_probs(img, scales=(0.75, 1.0, 1.25)), mean, atol=1e-6)
        assert not torch.allclose(one[0.75], one[1.25], atol=1e-3)  # the scales differ
        both = p.native_probs(img, tta=True, scales=(0.75, 1.0))
        assert torch.allclose(both, (p.native_probs(img, tta=True, scales=(0.75,))
                                     + p.native_probs(img, tta=True, scales=(1.0,))) / 2, atol=1e-6)


@pytest.mark.parametrize("bad", ["", "a", "0", "-1", "10", "1,1", "0.5,", "nan", "inf"])
def test_bad_scales_are_one_line_errors(bad):
    with pytest.raises(TwostageError, match="--scales"):
        parse_scales(bad)


@pytest.mark.parametrize("bad", [1, 1.5, -0.1, float("nan"), "x"])
def test_bad_overlaps_are_one_line_errors(bad):
    with pytest.raises(TwostageError, match="--overlap"):
        check_overlap(bad)


@pytest.mark.parametrize("window", [{"size": [8, 8], "scale": 1.0}, {"size": [64, 64], "scale": 0},
                                    {"size": [64, 64], "scale": 9}, {"size": [64], "scale": 1},
                                    {"size": [64, 64], "scale": True}, {"size": "64", "scale": 1}, [64]])
def test_bad_windows_in_a_checkpoint_are_refused(make_tiny_checkpoint, tmp_path, window):
    path = make_tiny_checkpoint(tmp_path / "bad.pt", "global", window=window)
    with pytest.raises(TwostageError, match="window"):
        Predictor.from_checkpoint(path)
    assert Window((64, 64), 1).scale == 1.0


@pytest.mark.parametrize("override, match", [("data.patch=8", "data.patch"), ("data.patch_scale=0", "patch_scale"),
                                             ("data.patch_scale=5", "patch_scale"),
                                             ("data.patch_foreground=1.5", "patch_foreground")])
def test_bad_patch_configs_are_one_line_errors(override, match):
    with pytest.raises(TwostageError, match=match):
        load_config("demo-global-patch", overrides=[override])


@pytest.mark.parametrize("flags, match", [(["--overlap", "1"], "--overlap"), (["--scales", "abc"], "--scales"),
                                          (["--scales", "0"], "--scales"), (["--accumulate", "gpu"], "--accumulate")])
def test_cli_bad_window_options(make_tiny_checkpoint, tmp_path, data, flags, match):
    ckpt = make_tiny_checkpoint(tmp_path / "g.pt", "global")
    r = run_cli("infer", data, "--global", ckpt, "--out", tmp_path / "o.csv", "--split", "train", *flags)
    assert_one_line_error(r, match, rc=2)
    assert not (tmp_path / "o.csv").exists()


def test_window_sampler_centres_on_bones():
    from twostage.train.datasets import window_origin

    masks = np.zeros((3, 200, 300), np.uint8)
    masks[1, 150:160, 250:260] = 1
    present = np.flatnonzero(masks.any(axis=(1, 2)))
    rng = np.random.default_rng(0)
    for _ in range(20):
        y0, x0 = window_origin((200, 300), 40, present, lambda c: np.nonzero(masks[c]), 1.0, rng)
        assert masks[1, y0:y0 + 40, x0:x0 + 40].any()  # every foreground window holds the bone
        assert 0 <= y0 <= 160 and 0 <= x0 <= 260
    y0, x0 = window_origin((30, 30), 40, [], lambda c: np.nonzero(masks[c]), 1.0, rng)
    assert (y0, x0) == (0, 0)  # nothing to centre on, and the image smaller than the window


def test_patch_training_then_infer_fuse_and_evaluate(data, tmp_path, make_tiny_checkpoint):
    """A patch-trained global checkpoint: windows in training, the window in its meta,
    validation through the sliding window, and infer --fuse / evaluate run on it."""
    from twostage.checkpoint import load_checkpoint
    from twostage.evaluation.evaluate import evaluate
    from twostage.inference.infer import infer
    from twostage.rle import read_csv
    from twostage.train import train_stage

    tiny = ["model.arch=Unet", "model.encoder=resnet18", "model.encoder_weights=none",
            "model.kwargs={encoder_depth: 3, decoder_channels: [16, 8, 8]}", "data.folds=4",
            "data.patch=48", "data.patch_scale=0.75", "train.val_every=1"]
    run = train_stage("global", overrides=tiny, data=str(data), out=str(tmp_path / "g"), epochs=1,
                      batch_size=2, workers=0, device="cpu")
    meta = load_checkpoint(run / "best.pt")["meta"]
    assert meta["window"] == {"size": [48, 48], "scale": 0.75} and meta["input_size"] == [48, 48]
    assert "overall" in (run / "metrics.csv").read_text().splitlines()[0]
    palm = make_tiny_checkpoint(tmp_path / "p.pt", "palm", classes=["Trapezium", "Capitate"])
    out = tmp_path / "f.csv"
    infer(data, run / "best.pt", out, palm_ckpt=palm, fuse=True, split="train", scales="0.75,1.0", tta="hflip")
    rows = read_csv(out)
    assert len(rows) == 8 and all(len(v) == 29 for v in rows.values())
    result = evaluate(data, run / "best.pt", palm, tmp_path / "ev", overlap=0.25)
    assert (tmp_path / "ev" / "fused.csv").is_file() and result is not None


def test_windows_that_see_too_little_of_the_image_warn(data):
    """A window of a small share of the hand cannot tell the fingers apart: training says so."""
    from twostage.data.layout import find_samples
    from twostage.train.sources import window_warning

    samples = find_samples(data)  # 128² images
    small = load_config("demo-global-patch", overrides=["data.patch=32", "data.patch_scale=1.0"])
    assert "covers 25% of the image side (128 px)" in window_warning(small, samples)
    half = load_config("demo-global-patch", overrides=["data.patch=32", "data.patch_scale=0.5"])
    assert window_warning(half, samples) is None
    assert window_warning(load_config("demo-global"), samples) is None
