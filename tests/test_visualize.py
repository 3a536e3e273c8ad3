"""`twostage visualize`: three-colour overlap pictures from a CSV or from checkpoints."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.cli import main
from twostage.data.layout import find_samples
from twostage.data.masks import load_masks
from twostage.errors import TwostageError
from twostage.evaluation.visualize import BOX_COLOUR, CHART_COLOURS, dice_change_chart, visualize
from twostage.rle import encode_masks, write_csv

SIZE = 128


@pytest.fixture(scope="module")
def data(make_phantoms) -> Path:
    return make_phantoms("vis", n=2, size=SIZE, seed=4)


def _prediction(data: Path, csv: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A CSV whose Capitate is shifted 4 px right and whose Radius is missing; returns GT, pred."""
    out, rows = {}, []
    for s in find_samples(data):
        gt = load_masks(s).astype(bool)
        pred = gt.copy()
        k = CLASSES.index("Capitate")
        pred[k] = np.roll(gt[k], 4, axis=1)
        pred[CLASSES.index("Radius")] = False
        rows.append((s.name, encode_masks(pred)))
        out[s.name] = (gt, pred)
    write_csv(csv, rows)
    return out


def _dominant(picture: np.ndarray, channel: int, margin: int = 30) -> np.ndarray:
    """Pixels whose BGR `channel` exceeds both others by `margin`."""
    p = picture.astype(int)
    others = [c for c in range(3) if c != channel]
    return (p[..., channel] > p[..., others[0]] + margin) & (p[..., channel] > p[..., others[1]] + margin)


def test_overlap_panel_shows_three_colours_where_gt_and_prediction_differ(data, tmp_path):
    truth = _prediction(data, tmp_path / "pred.csv")
    out = tmp_path / "vis"
    assert main(["visualize", str(data), "--csv", str(tmp_path / "pred.csv"), "--out", str(out)]) == 0
    for name, (gt, pred) in truth.items():
        picture = cv2.imread(str(out / f"{Path(name).stem}.png"))
        assert picture.shape[1] == 3 * SIZE and picture.shape[0] > SIZE  # 3 panels + legend
        overlap = picture[:SIZE, 2 * SIZE:]
        box_line = np.abs(overlap.astype(int) - BOX_COLOUR).sum(-1) < 10
        assert box_line.sum() > 100  # the palm box derived from the predicted carpals
        rows = (np.arange(SIZE)[:, None] >= 24) & ~box_line  # below the panel title, off the box outline
        tp = (gt & pred).any(0) & rows
        fn = (gt & ~pred).any(0) & rows
        fp = (pred & ~gt).any(0) & rows
        for where, channel in ((fp, 2), (fn, 0)):  # red: prediction only, blue: GT only (BGR)
            where = where & ~(fn if channel == 2 else fp)
            assert where.sum() > 20
            assert _dominant(overlap, channel)[where].mean() > 0.9
        ok = tp & ~fn & ~fp
        assert _dominant(overlap, 1)[ok].mean() > 0.9  # green: both
        # and the three colours are confined to where the masks are
        assert not _dominant(overlap, 2)[~(gt | pred).any(0) & rows].any()


def test_per_class_pictures_only_for_classes_with_errors_and_palm_box(data, tmp_path):
    _prediction(data, tmp_path / "pred.csv")
    out = tmp_path / "vis"
    summary = visualize(data, out, csv=tmp_path / "pred.csv", per_class=True, images=[find_samples(data)[0].name])
    stem = Path(find_samples(data)[0].name).stem
    assert sorted(p.name for p in (out / stem).iterdir()) == ["Capitate.png", "Radius.png"]
    assert summary.images == 1 and len(summary.files) == 3
    zoom = cv2.imread(str(out / stem / "Capitate.png"))
    assert zoom.shape[1] >= 3 * 256  # small bones are enlarged to a readable size
    overview = cv2.imread(str(out / f"{stem}.png"))
    assert (np.abs(overview[:SIZE].astype(int) - BOX_COLOUR).sum(-1) < 10).sum() > 100  # palm box from carpals
    # --classes palm: fingers and forearm are not drawn as errors
    visualize(data, tmp_path / "palm", csv=tmp_path / "pred.csv", classes=PALM_CLASSES, per_class=True)
    assert sorted(p.name for p in (tmp_path / "palm" / stem).iterdir()) == ["Capitate.png"]


def test_checkpoints_fused_and_errors(data, tmp_path, make_tiny_checkpoint):
    g = make_tiny_checkpoint(tmp_path / "g.pt", "global")
    p = make_tiny_checkpoint(tmp_path / "p.pt", "palm", classes=PALM_CLASSES, seed=1)
    out = tmp_path / "vis"
    rc = main(["visualize", str(data), "--global", str(g), "--palm", str(p), "--fuse", "--out", str(out),
               "--per-class", "--image", Path(find_samples(data)[1].name).stem])
    assert rc == 0
    stem = Path(find_samples(data)[1].name).stem
    picture = cv2.imread(str(out / f"{stem}.png"))
    assert (np.abs(picture[:SIZE].astype(int) - BOX_COLOUR).sum(-1) < 10).any()  # the box the chain used
    assert any((out / stem).iterdir())
    with pytest.raises(TwostageError, match="no image named nope"):
        visualize(data, out, global_ckpt=g, images=["nope"])
    with pytest.raises(TwostageError, match="either a prediction CSV"):
        visualize(data, out)


def test_dice_change_chart_draws_the_change_carpals_first(tmp_path):
    """The first bar row is a carpal, its bar length is the change (not the Dice), and odd
    input (no change at all, a loss, a missing value) still gives a picture."""
    g = np.full(len(CLASSES), 0.9)
    f = g.copy()
    f[CLASSES.index(PALM_CLASSES[0])] = 0.95          # +0.05: the largest change, the axis end
    f[CLASSES.index("Radius")] = 0.89                 # a loss: a bar left of zero
    path = tmp_path / "chart.png"
    dice_change_chart(path, list(CLASSES), {"global": g, "fused": f})
    img = cv2.imread(str(path))
    orange = np.all(img == CHART_COLOURS[0], axis=2)
    bars = np.flatnonzero(orange.sum(axis=1) > 20)   # bar rows (the legend swatch is 13 px wide)
    assert orange[bars[0]].sum() > img.shape[1] // 3  # +0.05 spans most of the plot, not 5 % of it
    assert bars[0] < img.shape[0] // 4                # the carpal rows come first
    f[0] = np.nan
    for series in ({"global": g, "fused": g}, {"global": g, "fused": f, "calibrated": f}):
        dice_change_chart(path, list(CLASSES), series)
        assert cv2.imread(str(path)) is not None
