"""The fusion rule of docs/DESIGN.md §3, the feather window and the per-class value files."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from twostage.classes import CLASSES, NUM_CLASSES, PALM_CLASSES, PALM_INDICES
from twostage.errors import TwostageError
from twostage.fusion import DEFAULT_PALM_WEIGHT, binarize, feather_window, fuse, fuse_weights, thresholds


@dataclass
class B:  # any object with x0, y0, side is a box for the fusion
    x0: int
    y0: int
    side: int


def _probs(seed: int, shape) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_weight_zero_leaves_global_exactly():
    g = _probs(0, (NUM_CLASSES, 64, 80))
    ref = g.clone()
    palm = _probs(1, (len(PALM_CLASSES), 30, 30))
    out = fuse(g, palm, B(20, 10, 30), torch.zeros(NUM_CLASSES), feather=0.2)
    assert out is g
    assert torch.equal(g, ref)


def test_weight_one_no_feather_is_palm_inside_global_outside():
    g = _probs(0, (NUM_CLASSES, 64, 80))
    ref = g.clone()
    palm = _probs(1, (len(PALM_CLASSES), 30, 30))
    box = B(20, 10, 30)
    fuse(g, palm, box, fuse_weights(1.0), feather=0.0)
    idx = list(PALM_INDICES)
    assert torch.equal(g[idx, 10:40, 20:50], palm)
    inside = torch.zeros(64, 80, dtype=torch.bool)
    inside[10:40, 20:50] = True
    assert torch.equal(g[idx][:, ~inside], ref[idx][:, ~inside])
    others = [c for c in range(NUM_CLASSES) if c not in idx]
    assert torch.equal(g[others], ref[others])


def test_default_weight_blends_linearly():
    g = torch.zeros(NUM_CLASSES, 32, 32)
    palm = torch.ones(len(PALM_CLASSES), 16, 16)
    fuse(g, palm, B(8, 8, 16), fuse_weights(), feather=0.0)
    assert torch.allclose(g[list(PALM_INDICES), 8:24, 8:24], torch.full((8, 16, 16), DEFAULT_PALM_WEIGHT))
    assert g.sum() == pytest.approx(DEFAULT_PALM_WEIGHT * 8 * 16 * 16, rel=1e-5)


def test_batched_fuse_and_half_precision():
    g = _probs(0, (2, NUM_CLASSES, 40, 40)).half()
    ref = g.clone()
    palms = [torch.ones(8, 10, 10), torch.zeros(8, 20, 20)]
    boxes = [B(0, 0, 10), B(20, 20, 20)]
    fuse(g, palms, boxes, fuse_weights(1.0), feather=0.0)
    assert g.dtype == torch.float16
    assert (g[0, list(PALM_INDICES), :10, :10] == 1).all()
    assert (g[1, list(PALM_INDICES), 20:, 20:] == 0).all()
    assert torch.equal(g[0, :, 10:, :], ref[0, :, 10:, :])


def test_feather_window_properties():
    # box in the middle: ramps on all four sides, 1 in the interior, symmetric
    w = feather_window((20, 20), B(10, 10, 20), (64, 64), ramp=5)
    assert w.shape == (20, 20) and w.dtype == torch.float32
    assert (w[5:15, 5:15] == 1).all()
    assert w[0, 10] == pytest.approx(0.1) and w[10, 0] == pytest.approx(0.1)
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1)) and torch.allclose(w, w.T)
    assert (w > 0).all() and (w <= 1).all()
    assert (w[:10, 10].diff() >= 0).all()  # monotone towards the interior
    # box at the top-left image corner: those borders stay 1
    w = feather_window((20, 20), B(0, 0, 20), (64, 64), ramp=5)
    assert (w[0, :15] == 1).all() and (w[:15, 0] == 1).all()
    assert w[-1, 5] < 1 and w[5, -1] < 1
    # box covering the whole image: all ones
    assert (feather_window((32, 32), B(0, 0, 32), (32, 32), ramp=8) == 1).all()
    assert (feather_window((20, 20), B(10, 10, 20), (64, 64), ramp=0) == 1).all()
    with pytest.raises(TwostageError):
        feather_window((20, 20), B(50, 50, 20), (64, 64), ramp=5)


def test_feather_keeps_global_at_box_border():
    g = torch.zeros(NUM_CLASSES, 64, 64)
    palm = torch.ones(8, 32, 32)
    fuse(g, palm, B(16, 16, 32), fuse_weights(1.0), feather=0.25)
    c = PALM_INDICES[0]
    assert g[c, 16, 32] < 0.1 and g[c, 32, 32] == 1  # near-global at the edge, palm in the middle


def test_fuse_rejects_wrong_sizes():
    g = torch.zeros(NUM_CLASSES, 64, 64)
    with pytest.raises(TwostageError, match="box size"):
        fuse(g, torch.ones(8, 20, 20), B(0, 0, 32), fuse_weights())
    with pytest.raises(TwostageError, match="shape"):
        fuse(g, torch.ones(8, 32, 32), B(0, 0, 32), torch.zeros(8))


def test_fuse_weights_and_thresholds_files(tmp_path):
    w = fuse_weights()
    assert w[list(PALM_INDICES)].eq(DEFAULT_PALM_WEIGHT).all() and w.sum() == pytest.approx(8 * 0.7)
    f = tmp_path / "w.yaml"
    f.write_text("fuse_weights:\n  default: 0.5\n  Lunate: 0.9\nthresholds:\n  Radius: 0.3\n")
    w = fuse_weights(f)
    assert w[CLASSES.index("Lunate")] == pytest.approx(0.9)
    assert w[CLASSES.index("Capitate")] == pytest.approx(0.5)
    assert w[CLASSES.index("Radius")] == 0
    t = thresholds(f)
    assert t[CLASSES.index("Radius")] == pytest.approx(0.3) and t[0] == 0.5
    assert thresholds("0.4").eq(0.4).all()
    with pytest.raises(TwostageError, match="did you mean Lunate"):
        fuse_weights({"Lunat": 0.5})
    with pytest.raises(TwostageError, match="does not predict"):
        fuse_weights({"Radius": 0.5})
    with pytest.raises(TwostageError, match=r"\[0, 1\]"):
        thresholds({"Radius": 2})
    with pytest.raises(TwostageError, match="no such"):
        thresholds(tmp_path / "missing.yaml")


def test_binarize_per_class():
    p = torch.full((NUM_CLASSES, 4, 4), 0.45)
    t = thresholds({"finger-1": 0.4})
    m = binarize(p, t)
    assert m.dtype == torch.bool and m[0].all() and not m[1:].any()


def test_any_channel_mapping_and_exact_end_points():
    g = _probs(0, (NUM_CLASSES, 32, 32))
    ref = g.clone()
    palm = _probs(1, (2, 16, 16)) * 1e-6  # tiny values: g + (p - g) would not be exact
    w = torch.zeros(NUM_CLASSES)
    w[[0, 5]] = 1.0
    fuse(g, palm, B(8, 8, 16), w, feather=0.0, palm_channels=[0, 5])  # non-contiguous: index path
    assert torch.equal(g[[0, 5], 8:24, 8:24], palm)
    assert torch.equal(g[1:5], ref[1:5])
    g2 = ref.clone()
    fuse(g2, _probs(2, (8, 16, 16)) * 1e-6, B(8, 8, 16), fuse_weights(1.0), feather=0.0)
    assert torch.equal(g2[list(PALM_INDICES), 8:24, 8:24], _probs(2, (8, 16, 16)) * 1e-6)
