"""`twostage calibrate`: per-class fusion weights and thresholds that never lose to the defaults."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from twostage.calibrate import calibrate, parse_grid, threshold_counts
from twostage.classes import CLASSES, PALM_CLASSES
from twostage.cli import main
from twostage.errors import TwostageError
from twostage.infer import infer
from twostage.metrics import score_csv
from twostage.synth import synthesize


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_checkpoint) -> dict:
    base = tmp_path_factory.mktemp("calibrate")
    return {"root": synthesize(base / "DATA", n=3, size=128, seed=1),
            "global": make_tiny_checkpoint(base / "g.pt", "global"),
            "palm": make_tiny_checkpoint(base / "p.pt", "palm", classes=PALM_CLASSES, seed=1)}


def test_calibrated_files_never_score_worse_than_defaults(setup, tmp_path, capsys):
    out = tmp_path / "cal"
    rc = main(["calibrate", str(setup["root"]), "--global", str(setup["global"]), "--palm", str(setup["palm"]),
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "carpal mean" in printed and "fuse_weights.yaml" in printed
    weights = yaml.safe_load((out / "fuse_weights.yaml").read_text())["fuse_weights"]
    thresholds = yaml.safe_load((out / "thresholds.yaml").read_text())["thresholds"]
    assert list(weights) == list(PALM_CLASSES) and list(thresholds) == list(CLASSES)
    report = json.loads((out / "calibration.json").read_text())
    assert report["calibrated_overall"] >= report["default_overall"]
    assert all(report["calibrated_dice"][c] >= report["default_dice"][c] for c in CLASSES)
    assert report["calibrated_overall"] > report["default_overall"]  # random models: thresholds matter

    # the files work with infer, and infer + score reproduce calibrate's own numbers exactly
    default_csv, cal_csv = tmp_path / "default.csv", tmp_path / "cal.csv"
    kw = dict(palm_ckpt=setup["palm"], fuse=True, split="train")
    infer(setup["root"], setup["global"], default_csv, **kw)
    infer(setup["root"], setup["global"], cal_csv, thresholds=out / "thresholds.yaml",
          fuse_weights=out / "fuse_weights.yaml", **kw)
    before, after = score_csv(default_csv, setup["root"]), score_csv(cal_csv, setup["root"])
    assert after.overall >= before.overall and after.carpal_mean >= before.carpal_mean
    assert before.overall == pytest.approx(report["default_overall"], abs=1e-9)
    assert after.overall == pytest.approx(report["calibrated_overall"], abs=1e-9)
    for c in CLASSES:
        assert after.value(c) == pytest.approx(report["calibrated_dice"][c], abs=1e-9)


def test_grid_without_defaults_still_contains_them(setup, tmp_path):
    r = calibrate(setup["root"], setup["global"], setup["palm"], tmp_path, weight_grid=[0.0, 1.0],
                  threshold_grid=[0.3], images=[Path(p).name for p in sorted((setup["root"] / "train" / "DCM").rglob("*.png"))][:1])
    assert r.weight_grid == [0.0, 0.7, 1.0] and r.threshold_grid == [0.3, 0.5] and r.n_images == 1
    assert all(r.calibrated_dice[c] >= r.default_dice[c] for c in CLASSES)
    assert set(r.fuse_weights.values()) <= {0.0, 0.7, 1.0} and set(r.thresholds.values()) <= {0.3, 0.5}


def test_threshold_counts_match_brute_force():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand((5, 400), generator=g)
    probs[:, :20] = 0.5  # exactly on a threshold: p > t is strict, as in fusion.binarize
    gt = torch.rand((5, 400), generator=g) > 0.6
    thr = torch.tensor([0.1, 0.25, 0.5, 0.9])
    inter, pred = threshold_counts(probs, gt, thr)
    for j, t in enumerate(thr):
        m = probs > t
        assert (pred[:, j] == m.sum(1)).all() and (inter[:, j] == (m & gt).sum(1)).all()


def test_parse_grid():
    assert parse_grid("0:1:0.25", "grid") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert parse_grid("0.3,0.5", "grid") == (0.3, 0.5)
    for bad in ("0,2", "a,b", "0:1:0", ""):
        with pytest.raises(TwostageError, match="--grid"):
            parse_grid(bad, "grid")
