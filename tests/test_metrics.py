"""Dice of docs/DESIGN.md §2 and the score report."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.errors import TwostageError
from twostage.metrics import ScoreReport, dice_per_class, summarize


def masks_with_squares(c: int = 4, size: int = 64) -> np.ndarray:
    m = np.zeros((c, size, size), np.uint8)
    for i in range(c):
        m[i, 4 * i: 4 * i + 20, 10:30] = 1  # 400 pixels each
    return m


def test_dice_of_a_mask_with_itself_is_one():
    m = masks_with_squares()
    assert np.array_equal(dice_per_class(m, m), np.ones(4))


def test_dice_known_perturbation():
    gt = masks_with_squares()
    pred = gt.copy()
    pred[0, 4:9, 10:30] = 0  # remove k = 100 of n = 400 pixels
    pred[1, 0:2, 40:50] = 1  # add 20 false-positive pixels
    pred[2] = 0  # miss everything
    d = dice_per_class(pred, gt)
    assert d.dtype == np.float64 and d.shape == (4,)
    assert d[0] == pytest.approx((2 * 300 + 1e-4) / (300 + 400 + 1e-4), abs=1e-12)
    assert d[1] == pytest.approx((2 * 400 + 1e-4) / (420 + 400 + 1e-4), abs=1e-12)
    assert d[2] == pytest.approx(1e-4 / (400 + 1e-4), abs=1e-12)
    assert d[3] == 1.0


def test_dice_both_empty_is_one_and_one_empty_is_near_zero():
    empty = np.zeros((2, 8, 8), np.uint8)
    full = np.ones((2, 8, 8), np.uint8)
    assert np.array_equal(dice_per_class(empty, empty), [1.0, 1.0])
    assert (dice_per_class(empty, full) < 1e-5).all()


def test_dice_numpy_torch_and_dtypes_agree():
    rng = np.random.default_rng(0)
    gt = (rng.uniform(size=(5, 33, 47)) < 0.3).astype(np.uint8)
    pred = (rng.uniform(size=(5, 33, 47)) < 0.4).astype(np.uint8)
    expected = dice_per_class(pred, gt)
    hand = [(2 * (p & g).sum() + 1e-4) / (p.sum() + g.sum() + 1e-4) for p, g in zip(pred, gt)]
    np.testing.assert_allclose(expected, hand, rtol=0, atol=1e-12)
    for p, g in [(pred.astype(bool), gt * 255), (torch.from_numpy(pred), gt),
                 (torch.from_numpy(pred).bool(), torch.from_numpy(gt).float())]:
        d = dice_per_class(p, g)
        assert isinstance(d, np.ndarray) and d.dtype == np.float64
        np.testing.assert_array_equal(d, expected)


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def test_summarize_means_over_images_then_classes():
    classes = ("finger-1", "Lunate", "Pisiform")
    report = summarize({"a.png": np.array([1.0, 0.5, 0.0]), "b.png": np.array([0.5, 0.5, 1.0])}, classes)
    np.testing.assert_allclose(report.per_class, [0.75, 0.5, 0.5])
    assert report.carpal_mean == pytest.approx(0.5)
    assert report.overall == pytest.approx(1.75 / 3)
    assert report.n_images == 2
    d = report.to_dict()
    assert d["per_class"] == {"finger-1": 0.75, "Lunate": 0.5, "Pisiform": 0.5}
    assert d["per_image"]["a.png"] == [1.0, 0.5, 0.0]


def test_summarize_without_carpals_and_empty():
    assert summarize({"a": np.array([0.3])}, ("Radius",)).carpal_mean is None
    with pytest.raises(TwostageError, match="no images"):
        summarize({}, CLASSES)


def test_table_single_and_side_by_side():
    n = len(CLASSES)
    base = summarize({"a": np.full(n, 0.5)}, CLASSES)
    better = summarize({"a": np.where(np.isin(CLASSES, PALM_CLASSES), 0.8, 0.5)}, CLASSES)
    single = base.table().splitlines()
    assert single[0].split() == ["class", "dice"]
    assert any(ln.split() == ["carpal", "mean", "0.5000"] for ln in single)
    lines = base.table(better, names=("global", "fused")).splitlines()
    assert lines[0].split() == ["class", "global", "fused", "diff"]
    assert len({len(ln) for ln in lines if ln.startswith(("finger", "Lunate", "Ulna"))}) == 1  # aligned
    assert next(ln for ln in lines if ln.startswith("Lunate")).split() == ["Lunate", "0.5000", "0.8000", "+0.3000"]
    assert next(ln for ln in lines if ln.startswith("carpal")).split()[-1] == "+0.3000"
    assert next(ln for ln in lines if ln.startswith("finger-1 ")).split()[-1] == "+0.0000"


def test_table_with_different_class_sets():
    full = summarize({"a": np.full(len(CLASSES), 0.5)}, CLASSES)
    palm = summarize({"a": np.full(8, 0.9)}, PALM_CLASSES)
    lines = full.table(palm, names=("all", "palm")).splitlines()
    assert next(ln for ln in lines if ln.startswith("Ulna")).split() == ["Ulna", "0.5000", "-", "-"]
    assert isinstance(full, ScoreReport)
