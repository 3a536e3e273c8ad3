"""The palm box rule and its forward/inverse mapping (twostage.box)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import reference as R
import torch

from twostage import box as B
from twostage.classes import PALM_CLASSES, PALM_INDICES
from twostage.data.annotations import Annotation, rasterize
from twostage.data.synth import render_hand
from twostage.errors import TwostageError
from twostage.metrics import dice_per_class

SIZE = 192


@pytest.fixture(scope="module")
def hands() -> list[tuple[np.ndarray, list[Annotation]]]:
    rng = np.random.default_rng(3)
    return [render_hand(rng, SIZE, side="LR"[i % 2]) for i in range(6)]


def carpal_points(anns: list[Annotation]) -> np.ndarray:
    return np.concatenate([a.points for a in anns if a.label in PALM_CLASSES])


def inside(pts: np.ndarray, b: B.Box) -> bool:
    return bool(((pts[:, 0] >= b.x0) & (pts[:, 0] < b.x1) & (pts[:, 1] >= b.y0) & (pts[:, 1] < b.y1)).all())


def test_box_contains_every_carpal_point(hands):
    rule = B.BoxRule(margin=0.15)
    for img, anns in hands:
        b = B.box_from_annotations(anns, img.shape, rule)
        pts = carpal_points(anns)
        assert inside(pts, b)
        extent = max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1])) + 1
        assert b.side == pytest.approx(extent * 1.3, abs=1.5)
        assert 0 <= b.x0 and b.x1 <= SIZE and 0 <= b.y0 and b.y1 <= SIZE


def test_zero_margin_is_tight():
    pts = np.array([[10, 20], [30, 25], [12, 40]])
    b = B.box_from_points(pts, (100, 100), B.BoxRule(margin=0))
    assert b == B.Box(10, 20, 21)  # y extent 20..40 = 21 px, x centred: 10..30


def test_box_touching_the_border_stays_inside():
    rule = B.BoxRule(margin=0.3)
    for pts in ([[0, 0], [10, 12]], [[118, 90], [127, 127]], [[0, 120], [5, 127]]):
        pts = np.array(pts)
        b = B.box_from_points(pts, (128, 128), rule)
        assert 0 <= b.x0 and b.x1 <= 128 and 0 <= b.y0 and b.y1 <= 128
        assert inside(pts, b)
    big = B.box_from_points(np.array([[0, 0], [127, 60]]), (64, 128), rule)  # wider than the image is tall
    assert big.side == 64 and big.y0 == 0 and big.x1 <= 128


def test_side_range_and_rule_roundtrip():
    rule = B.BoxRule(margin=0.1, side_min=0.3, side_max=0.4, fallback=(0.5, 0.6, 0.35))
    assert B.BoxRule.from_dict(rule.to_dict()) == rule
    small = B.box_from_points(np.array([[50, 50], [52, 52]]), (100, 100), rule)
    assert small.side == 30
    with pytest.raises(TwostageError, match="unknown key"):
        B.BoxRule.from_dict({"margin": 0.1, "marign": 0.2})
    with pytest.raises(TwostageError, match="side_min"):
        B.BoxRule(side_min=0.5, side_max=0.2)


def test_no_carpals_gives_none():
    anns = [Annotation("finger-1", np.array([[1, 1], [5, 1], [5, 5]], dtype=np.int32))]
    assert B.box_from_annotations(anns, (64, 64), B.BoxRule()) is None


def test_points_roundtrip_and_pixel_centres():
    b = B.Box(17, 30, 40)
    pts = np.array([[17, 30], [56, 69], [33.25, 41.5]])
    for s in (1, 2, 4):
        np.testing.assert_allclose(R.points_to_source(B.points_to_crop(pts, b, s), b, s), pts)
    # the centre of source pixel x0 is the centre of the s x s block at the crop origin
    np.testing.assert_allclose(B.points_to_crop([[17, 30]], b, 4), [[1.5, 1.5]])


@pytest.mark.parametrize("as_torch", [False, True])
def test_mask_forward_inverse_is_identity(hands, as_torch):
    img, anns = hands[0]
    masks = rasterize(anns, img.shape)
    b = B.box_from_annotations(anns, img.shape, B.BoxRule())
    arr = torch.from_numpy(masks) if as_torch else masks
    crop = R.source_to_crop(arr, b, 4)
    assert tuple(crop.shape) == (29, b.side * 4, b.side * 4)
    back = R.crop_to_source(crop, b, 4)
    full = torch.zeros_like(arr) if as_torch else np.zeros_like(masks)
    R.paste(full, back, b)
    expect = np.zeros_like(masks)
    expect[:, b.y0:b.y1, b.x0:b.x1] = masks[:, b.y0:b.y1, b.x0:b.x1]
    np.testing.assert_array_equal(np.asarray(full), expect)
    # float probabilities: within resize rounding
    probs = arr.float() if as_torch else masks.astype(np.float32)
    back = R.crop_to_source(R.source_to_crop(probs, b, 2), b, 2)
    err = np.abs(np.asarray(back) - np.asarray(B.crop_image(probs, b)))
    assert err.mean() < 0.02
    with pytest.raises(TwostageError, match="expected"):
        R.crop_to_source(crop[..., :-1, :], b, 4)


def test_crop_image_of_an_upscaled_crop_is_the_upscaled_box(hands):
    """crop_image(crop, box, scale): the box region in a crop already upscaled by `scale` is the
    box cut first and upscaled after (nearest-neighbour upscaling: an exact identity)."""
    img, anns = hands[0]
    masks = rasterize(anns, img.shape)
    ctx = B.box_from_annotations(anns, img.shape, B.BoxRule()).grown(1.5, img.shape)
    inner = B.Box(ctx.x0 + 5, ctx.y0 + 7, ctx.side // 2)
    up = R.source_to_crop(B.crop_image(masks, ctx), B.Box(0, 0, ctx.side), 3)
    np.testing.assert_array_equal(B.crop_image(up, inner.relative_to(ctx), 3),
                                  R.source_to_crop(B.crop_image(masks, inner), B.Box(0, 0, inner.side), 3))
    assert np.shares_memory(B.crop_image(masks, inner), masks)  # a view, no copy


def test_polygon_clip_keeps_shape_inside_and_drops_outside():
    b = B.Box(10, 10, 20)
    square = np.array([[0, 0], [40, 0], [40, 40], [0, 40]])  # covers the whole crop
    clipped = B.polygon_to_crop(square, b, 1)
    assert clipped is not None and clipped[:, 0].min() == 0 and clipped[:, 0].max() == 19
    assert rasterize([Annotation("Lunate", clipped)], (20, 20), classes=["Lunate"]).all()
    assert B.polygon_to_crop(np.array([[50, 50], [60, 50], [60, 60]]), b, 2) is None
    # a triangle poking into the crop: clipped, not clamped (clamping would move the apex)
    tri = np.array([[0, 15], [20, 15], [0, 25]])
    c = B.polygon_to_crop(tri, b, 1)
    r = rasterize([Annotation("Lunate", c)], (20, 20), classes=["Lunate"])[0]
    src = rasterize([Annotation("Lunate", tri)], (40, 40), classes=["Lunate"])[0][10:30, 10:30]
    assert dice_per_class(r[None], src[None])[0] > 0.95


def test_boxes_from_probs_matches_training_box(hands):
    rule = B.BoxRule(margin=0.15, side_min=0.1, side_max=0.9)
    masks = np.stack([rasterize(anns, img.shape)[list(PALM_INDICES)] for img, anns in hands])
    probs = torch.from_numpy(masks).float()
    probs[0, 0, 2:5, 2:5] = 1.0  # a far false-positive blob must not drag the box
    got = B.boxes_from_probs(probs, rule)
    for (img, anns), b in zip(hands, got):
        ref = B.box_from_annotations(anns, img.shape, rule)
        assert abs(b.side - ref.side) <= 0.1 * ref.side
        assert np.hypot(b.center[0] - ref.center[0], b.center[1] - ref.center[1]) <= 0.05 * ref.side
    # probabilities at half resolution, mapped to the source size
    half = torch.nn.functional.interpolate(probs, scale_factor=0.5, mode="bilinear")
    for (img, anns), b in zip(hands, B.boxes_from_probs(half, rule, image_shape=(SIZE, SIZE))):
        ref = B.box_from_annotations(anns, img.shape, rule)
        assert abs(b.side - ref.side) <= 0.1 * ref.side + 2


def test_boxes_from_probs_empty_uses_fallback_and_warns(caplog):
    probs = torch.zeros(2, 8, 100, 120)
    probs[1, 3, 40:60, 50:70] = 0.9
    rule = B.BoxRule(margin=0, fallback=(0.5, 0.25, 0.3))
    with caplog.at_level(logging.WARNING):
        b0, b1 = B.boxes_from_probs(probs, rule, names=["a.png", "b.png"])
    assert "a.png" in caplog.text and "b.png" not in caplog.text
    assert b0 == B.Box.around(60, 25, 30, (100, 120))
    assert b1 == B.Box(50, 40, 20)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        (b,) = B.boxes_from_probs(torch.zeros(1, 8, 100, 100), B.BoxRule(), names=["c.png"])
    assert "c.png" in caplog.text and "no fallback" in caplog.text
    assert b.side == round(B.DEFAULT_SIDE * 100) and b.center == pytest.approx((50, 50), abs=0.5)


def test_fallback_side_range_jitter():
    shapes = [(100, 100), (200, 200)]
    boxes = [B.Box(10, 20, 30), B.Box(100, 100, 40)]
    cx, cy, s = B.fallback_from_boxes(boxes, shapes)
    assert (cx, cy, s) == pytest.approx(((0.25 + 0.6) / 2, (0.35 + 0.6) / 2, (0.3 + 0.2) / 2))
    assert B.side_range_from_boxes(boxes, shapes) == pytest.approx((0.2, 0.3))
    rng = np.random.default_rng(0)
    b = B.Box(40, 40, 50)
    jit = [B.jitter_box(b, rng, shift=0.1, scale=0.15, image_shape=(128, 128)) for _ in range(200)]
    assert len(set(jit)) > 50
    for j in jit:
        assert 0 <= j.x0 and j.x1 <= 128 and 0 <= j.y0 and j.y1 <= 128
        assert 42 <= j.side <= 58
        assert abs(j.center[0] - b.center[0]) <= 5.5


def test_box_error_measures_what_jitter_draws():
    true = B.Box(100, 100, 50)
    assert B.box_error(true, true) == (0.0, 0.0)
    assert B.box_error(B.Box(105, 98, 50), true) == pytest.approx((0.1, 0.0))  # larger axis offset
    assert B.box_error(B.Box(95, 95, 60), true) == pytest.approx((0.0, 0.2))  # same centre, 1.2x side
    rng = np.random.default_rng(1)
    errors = np.array([B.box_error(B.jitter_box(true, rng, 0.05, 0.1, (512, 512)), true) for _ in range(300)])
    # rounding to whole pixels adds at most 1 px (0.02 of the side) to what jitter_box draws
    assert errors[:, 0].max() <= 0.05 + 0.02 and errors[:, 1].max() <= 0.1 + 0.02
    assert errors[:, 0].max() > 0.03 and errors[:, 1].max() > 0.07


def test_context_box_and_relative():
    b = B.Box(80, 80, 40)
    ctx = b.grown(1.5, (128, 128))
    assert ctx.side == 60 and ctx.x1 == 128  # shifted inside, still holds the box
    rel = b.relative_to(ctx)
    assert rel.x0 >= 0 and rel.x1 <= ctx.side


def test_palm_input_warning_below_native_box_side():
    sides = [450, 520, 560, 650]  # palm boxes of 2048² radiographs
    msg = B.palm_input_warning(sides, 384)
    assert msg is not None and "384" in msg and "median 540" in msg and "100% of 4" in msg
    assert "at least 1088" in msg  # 2x the median, to the encoder stride
    assert B.palm_input_warning(sides, 1024) is None
    assert B.palm_input_warning(sides, [1024, 512]) is not None  # the smaller side counts
    assert B.palm_input_warning([], 16) is None
