"""`twostage score` on a small dataset written to tmp_path."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.cli import main
from twostage.data.annotations import Annotation, rasterize, write_annotations
from twostage.errors import TwostageError
from twostage.evaluation.score import score_csv
from twostage.rle import encode_masks, read_csv, write_csv

NAMES = ["ID001/img_a_L.png", "ID001/img_a_R.png", "ID002/img_b_L.png"]
SHAPE = (96, 128)  # H, W: not square, so a transposed size would be caught


def random_annotations(rng: np.random.Generator) -> list[Annotation]:
    h, w = SHAPE
    anns = []
    for c in CLASSES:
        cx, cy = rng.integers(10, w - 10), rng.integers(10, h - 10)
        r = rng.integers(3, 15)
        t = np.linspace(0, 2 * np.pi, 9, endpoint=False)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
        anns.append(Annotation(c, np.rint(pts).astype(np.int32)))
    return anns


@pytest.fixture
def dataset(tmp_path):
    """DATA/train with three annotated images; returns (root, {name: (C,H,W) masks})."""
    rng = np.random.default_rng(0)
    root = tmp_path / "DATA"
    masks = {}
    for rel in NAMES:
        anns = random_annotations(rng)
        png = root / "train" / "DCM" / rel
        png.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(png), rng.integers(0, 255, SHAPE, dtype=np.uint8))
        write_annotations((root / "train" / "outputs_json" / rel).with_suffix(".json"), anns,
                          png.name, (2048, 2048))  # wrong metadata size on purpose: never trusted
        masks[png.name] = rasterize(anns, SHAPE)
    return root, masks


def gt_csv(path, masks, classes=CLASSES, drop=None):
    idx = [CLASSES.index(c) for c in classes]
    write_csv(path, [(n, encode_masks(m[idx])) for n, m in sorted(masks.items()) if n != drop], classes)
    return path


def test_score_gt_against_itself_is_one(dataset, tmp_path, capsys):
    root, masks = dataset
    pred = gt_csv(tmp_path / "gt.csv", masks)
    out = tmp_path / "report.json"
    assert main(["score", str(pred), "--gt", str(root), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "overall      1.0000" in table and "carpal mean  1.0000" in table
    report = json.loads(out.read_text())
    assert report["overall"] == 1.0 and report["carpal_mean"] == 1.0 and report["n_images"] == 3
    assert set(report["per_class"].values()) == {1.0}
    assert sorted(report["per_image"]) == sorted(masks)


def test_score_perturbed_prediction_matches_hand_computed_dice(dataset, tmp_path):
    root, masks = dataset
    pred = {n: m.copy() for n, m in masks.items()}
    lunate = CLASSES.index("Lunate")
    name = "img_a_R.png"
    ys, xs = np.nonzero(pred[name][lunate])
    k, n = 5, len(ys)
    pred[name][lunate, ys[:k], xs[:k]] = 0  # remove k of n pixels
    report = score_csv(gt_csv(tmp_path / "p.csv", pred), root)
    expected = ((2 * (n - k) + 1e-4) / (2 * n - k + 1e-4) + 2) / 3
    assert report.value("Lunate") == pytest.approx(expected, abs=1e-12)
    assert report.value("Capitate") == 1.0
    assert report.carpal_mean == pytest.approx((expected + 7) / 8, abs=1e-12)


def test_score_missing_image_is_an_error_naming_it(dataset, tmp_path, capsys):
    root, masks = dataset
    pred = gt_csv(tmp_path / "p.csv", masks, drop="img_b_L.png")
    assert main(["score", str(pred), "--gt", str(root)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "img_b_L.png" in err and "missing 1 of 3" in err


def test_score_missing_class_is_an_error_naming_it(dataset, tmp_path, capsys):
    root, masks = dataset
    pred = gt_csv(tmp_path / "p.csv", masks, classes=[c for c in CLASSES if c != "Pisiform"])
    assert main(["score", str(pred), "--gt", str(root)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Pisiform" in err


def test_score_missing_rows_of_one_image(dataset, tmp_path):
    root, masks = dataset
    pred = gt_csv(tmp_path / "p.csv", masks)
    lines = pred.read_text().splitlines()
    pred.write_text("\n".join(ln for ln in lines if not ln.startswith("img_a_L.png,Ulna")) + "\n")
    with pytest.raises(TwostageError, match="img_a_L.png/Ulna"):
        score_csv(pred, root)


def test_score_extra_image_is_reported_not_scored(dataset, tmp_path, caplog):
    root, masks = dataset
    pred = gt_csv(tmp_path / "p.csv", {**masks, "zzz_extra.png": np.zeros_like(masks["img_a_L.png"])})
    report = score_csv(pred, root)
    assert report.overall == 1.0 and report.n_images == 3
    assert report.to_dict()["extra_images"] == ["zzz_extra.png"]
    assert "zzz_extra.png" in caplog.text


def test_score_bad_rle_names_image_and_class(dataset, tmp_path):
    root, masks = dataset
    pred = gt_csv(tmp_path / "p.csv", masks)
    text = pred.read_text().replace("img_a_R.png,Hamate,", "img_a_R.png,Hamate,999999 5 ", 1)
    pred.write_text(text)
    with pytest.raises(TwostageError, match=r"img_a_R.png class Hamate: RLE run 1 .*ends beyond the 96x128"):
        score_csv(pred, root)


def test_score_palm_only_csv(dataset, tmp_path, capsys):
    root, masks = dataset
    pred = gt_csv(tmp_path / "palm.csv", masks, classes=PALM_CLASSES)
    assert list(read_csv(pred)["img_a_L.png"]) == list(PALM_CLASSES)
    assert main(["score", str(pred), "--gt", str(root), "--classes", "palm"]) == 0
    table = capsys.readouterr().out
    assert "Lunate" in table and "finger-1" not in table and "carpal mean  1.0000" in table
    assert main(["score", str(pred), "--gt", str(root)]) != 0  # all 29 classes wanted by default


def test_score_fixes_drop_image(dataset, tmp_path):
    root, masks = dataset
    fixes = tmp_path / "fixes.yaml"
    fixes.write_text("ID002/img_b_L.png:\n  drop_image: true\n")
    pred = gt_csv(tmp_path / "p.csv", masks, drop="img_b_L.png")
    report = score_csv(pred, root, fixes=fixes)
    assert report.n_images == 2 and report.overall == 1.0


def test_score_needs_ground_truth(dataset, tmp_path):
    root, masks = dataset
    (root / "train" / "outputs_json" / "ID002" / "img_b_L.json").unlink()
    with pytest.raises(TwostageError, match="no annotation JSON for 1 image"):
        score_csv(gt_csv(tmp_path / "p.csv", masks), root)


def test_score_command_runs_as_a_program(dataset, tmp_path):
    root, masks = dataset
    pred = gt_csv(tmp_path / "gt.csv", masks)
    r = run_cli("score", pred, "--gt", root, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["class", "dice"]
    r = run_cli("score", tmp_path / "nope.csv", "--gt", root, timeout=120)
    assert_one_line_error(r, "nope.csv", rc=2)
