"""Batched torch CLAHE (twostage/train/clahe.py) against OpenCV's cv2.createCLAHE.

The torch version repeats OpenCV's integer histogram arithmetic and its float32 interpolation
operation for operation, so the tests ask for the identical uint8 result (measured: exact on
every case here). A difference of one grey level on a few pixels would mean a changed OpenCV
or a rounding regression (e.g. a fused multiply-add) here.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import twostage.train.clahe as clahe_module
from twostage.train.clahe import clahe


def gradient(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth ramp plus noise: every tile has a broad histogram."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    return np.clip(x * 200.0 / w + y * 40.0 / h + rng.normal(0, 8, (h, w)), 0, 255).astype(np.uint8)


def phantom(h: int, w: int, seed: int = 1) -> np.ndarray:
    """Dark background with bright blobs, like an X-ray: tall narrow histograms that clip hard."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 10.0)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, max(3.0, min(h, w) / 5))
        img += rng.uniform(60, 200) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return np.clip(img + rng.normal(0, 3, (h, w)), 0, 255).astype(np.uint8)


def constant(h: int, w: int) -> np.ndarray:
    """One grey level: every histogram is a single spike, clipped to the maximum."""
    return np.full((h, w), 117, np.uint8)


IMAGES = {"gradient": gradient, "phantom": phantom, "constant": constant}


def opencv(img: np.ndarray, clip: float = 2.0, tiles: tuple[int, int] = (8, 8)) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=tiles).apply(img)


def ours(img: np.ndarray, clip: float = 2.0, tiles: tuple[int, int] = (8, 8),
         weight: torch.Tensor | None = None) -> np.ndarray:
    out = clahe(torch.from_numpy(img).float()[None], clip, tiles, None if weight is None else weight[None])
    return torch.round(out)[0].to(torch.uint8).numpy()


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() == 0, f"max diff {diff.max()}, {np.mean(diff == 0):.4%} of pixels equal"


# 200x312 divides by 8 (25 x 39); 203x317 divides on neither side (OpenCV pads with
# BORDER_REFLECT_101); 200x317 on one side only (OpenCV then pads a whole extra tile of rows)
@pytest.mark.parametrize("shape", [(160, 160), (256, 256), (200, 312), (203, 317), (200, 317), (9, 7)])
@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_matches_opencv(kind, shape):
    img = IMAGES[kind](*shape)
    assert_same(ours(img), opencv(img))


@pytest.mark.parametrize("kind", ["gradient", "phantom"])
def test_matches_opencv_1024(kind):
    img = IMAGES[kind](1024, 1024)
    assert_same(ours(img), opencv(img))


@pytest.mark.parametrize("clip,tiles", [(1.0, (8, 8)), (4.0, (8, 8)), (2.0, (4, 4)), (3.0, (3, 5)),
                                        (40.0, (8, 8)), (0.0, (8, 8))])
@pytest.mark.parametrize("kind", ["gradient", "phantom"])
def test_other_clip_limits_and_grids_match_opencv(kind, clip, tiles):
    """(3, 5) checks the (tiles_x, tiles_y) order; 0 switches clipping off, as in OpenCV."""
    for shape in [(256, 256), (203, 317)]:
        img = IMAGES[kind](*shape)
        assert_same(ours(img, clip, tiles), opencv(img, clip, tiles))


@pytest.mark.parametrize("chunk", [None, 7000])
def test_batch_equals_items_one_by_one(chunk, monkeypatch):
    """Also with small row chunks (7000 pixels, about 22 rows: chunks straddle the items)."""
    if chunk:
        monkeypatch.setattr(clahe_module, "_CHUNK_CPU", chunk)
    imgs = torch.from_numpy(np.stack([gradient(200, 317, 3), phantom(200, 317, 4), constant(200, 317)])).float()
    weight = torch.rand(imgs.shape, generator=torch.Generator().manual_seed(0))
    for w in [None, weight]:
        batch = clahe(imgs, weight=w)
        for i in range(len(imgs)):
            one = clahe(imgs[i:i + 1], weight=None if w is None else w[i:i + 1])
            assert torch.equal(batch[i:i + 1], one)
        if w is None:
            for i in range(len(imgs)):
                assert_same(torch.round(batch[i]).to(torch.uint8).numpy(), opencv(imgs[i].to(torch.uint8).numpy()))


def test_weight_of_ones_is_no_weight():
    imgs = torch.from_numpy(np.stack([gradient(203, 317), phantom(203, 317)])).float()
    assert torch.equal(clahe(imgs, weight=torch.ones_like(imgs)), clahe(imgs))


def test_zero_weight_hides_the_pixels_under_it():
    """What lies under zero weight does not reach any histogram: zero-filling a band half a
    tile wide changes nothing outside it. Without the weight, the band's zeros would change the
    first tile column's LUTs, and with them the pixels up to 1.5 tiles in."""
    img = phantom(256, 256, 5)  # tiles of 32 x 32
    filled = img.copy()
    filled[:, :16] = 0
    weight = torch.ones(256, 256)
    weight[:, :16] = 0
    a, b = ours(img, weight=weight), ours(filled, weight=weight)
    assert np.array_equal(a[:, 16:], b[:, 16:])
    assert not np.array_equal(ours(filled)[:, 16:48], b[:, 16:48])  # the weight does matter here


def test_tiles_without_weight_keep_their_levels_and_the_rest_is_opencv():
    """A tile row of zero weight gets the identity LUT; the rows that only blend the other
    tiles' LUTs are OpenCV's result."""
    img = gradient(256, 256, 6)  # tiles of 32 x 32: row 7 is y >= 224
    weight = torch.ones(256, 256)
    weight[224:] = 0
    got = ours(img, weight=weight)
    assert np.array_equal(got[240:], img[240:])  # blends tile row 7 only (y >= 7.5 tiles)
    assert np.array_equal(got[:208], opencv(img)[:208])  # blends tile rows 0..6 only (y < 6.5 tiles)


def test_fractional_weights_are_deterministic_and_in_range():
    imgs = torch.from_numpy(np.stack([phantom(160, 160, 7), gradient(160, 160, 8)])).float()
    weight = torch.rand(imgs.shape, generator=torch.Generator().manual_seed(1))
    weight[0, :, :40] = 0  # one whole tile column without weight
    a, b = clahe(imgs, weight=weight), clahe(imgs, weight=weight)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and a.shape == imgs.shape
    assert 0 <= a.min() and a.max() <= 255
    assert torch.equal(torch.round(a[0, :, :10]), imgs[0, :, :10])  # identity LUTs there


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        clahe(torch.zeros(8, 8))
    with pytest.raises(ValueError):
        clahe(torch.zeros(1, 8, 8), weight=torch.ones(1, 8, 9))
