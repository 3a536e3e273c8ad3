"""`twostage pseudo-label`: masks → polygons → rasterize is exact; the output is a dataset that
check and find_samples read; pseudo.json; confidence and --min-confidence; one-line errors."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from twostage.classes import CLASSES
from twostage.data.annotations import rasterize, read_annotations
from twostage.data.check import check_dataset
from twostage.data.layout import find_samples
from twostage.data.masks import load_masks
from twostage.data.pseudo_record import PSEUDO_RECORD, read_pseudo_record
from twostage.errors import TwostageError
from twostage.inference.probs import probs_file_name, read_probs, write_probs
from twostage.inference.pseudo import class_confidence, mask_polygons, masks_to_annotations, pseudo_label
from twostage.io.files import sha256_file
from twostage.metrics import dice_per_class
from twostage.rle import decode, encode_masks, read_csv, write_csv

SIZE = 128


@pytest.fixture(scope="module")
def data(make_phantoms) -> Path:
    return make_phantoms("pseudo", n=4, size=SIZE, seed=7)


@pytest.fixture(scope="module")
def gt_csv(data, tmp_path_factory) -> Path:
    """The ground truth of `data` as a prediction CSV."""
    path = tmp_path_factory.mktemp("gt") / "gt.csv"
    write_csv(path, [(s.name, encode_masks(load_masks(s))) for s in find_samples(data)])
    return path


@pytest.fixture(scope="module")
def labelled(data, gt_csv, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("labelled") / "PSEUDO"
    return out, pseudo_label(data, out, csv=gt_csv)


def _raster(sample) -> np.ndarray:
    return rasterize(read_annotations(sample.json_path), load_masks(sample).shape[1:])


# --------------------------------------------------------------------------- masks → polygons

def _hand_made() -> np.ndarray:
    """29 channels at 96²: the cases a bone mask can take."""
    m = np.zeros((len(CLASSES), 96, 96), np.uint8)
    k = CLASSES.index
    cv2.ellipse(m[k("Capitate")], (40, 40), (14, 10), 20, 0, 360, 1, -1)      # overlapping carpals
    cv2.ellipse(m[k("Hamate")], (52, 44), (12, 9), -10, 0, 360, 1, -1)
    cv2.circle(m[k("Lunate")], (30, 70), 14, 1, -1)                           # a ring
    cv2.circle(m[k("Lunate")], (30, 70), 6, 0, -1)
    cv2.circle(m[k("Scaphoid")], (70, 20), 6, 1, -1)                          # two components
    cv2.rectangle(m[k("Scaphoid")], (75, 60), (90, 70), 1, -1)
    m[k("finger-1"), 10, 5:60] = 1                                            # 1 px wide lines
    m[k("finger-2"), 5:50, 90] = 1
    np.fill_diagonal(m[k("finger-3"), 20:60, 10:50], 1)
    m[k("finger-4"), 50, 50] = 1                                              # one pixel, two pixels
    m[k("finger-5"), 60, 60:62] = 1
    m[k("Radius"), 80:, :] = 1                                                # touching three borders
    m[k("Radius"), 0:6, 0:4] = 1                                              # and a corner
    cv2.circle(m[k("Ulna")], (60, 60), 20, 1, -1)                             # two holes, an island in one
    cv2.circle(m[k("Ulna")], (52, 60), 7, 0, -1)
    cv2.circle(m[k("Ulna")], (70, 52), 4, 0, -1)
    m[k("Ulna"), 59:62, 51:54] = 1
    m[k("Triquetrum"), 30:40, 60:80] = 1                                      # a hole touching its border:
    m[k("Triquetrum"), 32:38, 62:78] = 0                                      # a 1 px rectangle outline
    return m                                                                  # Pisiform and others: empty


def test_hand_made_masks_round_trip_exactly():
    masks = _hand_made()
    annotations = masks_to_annotations(masks)
    back = rasterize(annotations, masks.shape[1:])
    for c, name in enumerate(CLASSES):
        assert np.array_equal(back[c], masks[c]), name
    assert dice_per_class(back, masks).min() >= 0.99
    count = {c: sum(a.label == c for a in annotations) for c in CLASSES}
    assert count["Lunate"] == 1 and count["Triquetrum"] == 1  # a ring is one polygon
    assert count["Scaphoid"] == 2 and count["Ulna"] == 2       # components, the island is its own
    assert count["Pisiform"] == 0 and count["Capitate"] == 1
    assert all(len(a.points) >= 3 for a in annotations)        # rasterize and check skip shorter ones
    points = np.concatenate([a.points for a in annotations])
    assert points.min() >= 0 and points.max() <= 95


def test_a_ring_is_one_polygon_that_leaves_the_hole_empty():
    ring = np.zeros((40, 40), np.uint8)
    cv2.circle(ring, (20, 20), 15, 1, -1)
    cv2.circle(ring, (20, 20), 8, 0, -1)
    (polygon,) = mask_polygons(ring)
    filled = np.zeros_like(ring)
    cv2.fillPoly(filled, [polygon.reshape(-1, 1, 2)], 1)  # alone, as data.rasterize fills it
    assert filled[20, 20] == 0 and np.array_equal(filled, ring)


def test_random_masks_round_trip_exactly():
    rng = np.random.default_rng(0)
    for t in range(150):
        h, w = (int(v) for v in rng.integers(1, 64, 2))
        if t % 2:
            mask = rng.random((h, w)) < rng.uniform(0.3, 0.8)  # noise: many holes, nested joins
        else:
            small = rng.random((max(1, h // 6), max(1, w // 6))).astype(np.float32)
            mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
        polygons = mask_polygons(mask)
        back = np.zeros((h, w), np.uint8)
        for p in polygons:
            cv2.fillPoly(back, [p.reshape(-1, 1, 2)], 1)
        assert np.array_equal(back, mask), (t, h, w)
        assert len(polygons) == cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


# --------------------------------------------------------------------------- from a CSV

def test_csv_pseudo_labels_are_the_predicted_masks(data, labelled):
    out, result = labelled
    assert result.images == 4 and not result.dropped_images and not result.dropped_classes
    source, written = find_samples(data), find_samples(out)
    assert [s.rel for s in written] == [s.rel for s in source]  # person IDs and names kept
    assert [s.id for s in written] == [s.id for s in source]
    for s, w in zip(source, written):
        assert w.json_path is not None
        gt = load_masks(s)
        back = rasterize(read_annotations(w.json_path), gt.shape[1:])
        assert dice_per_class(back, gt).min() >= 0.99
        assert np.array_equal(back, gt)


def test_output_passes_check(labelled):
    out, _ = labelled
    report = check_dataset(out)
    assert report.ok, report.text()
    assert report.splits["train"] == {"images": 4, "annotated": 4}
    assert not {"image_without_json", "json_without_image", "short_polygon", "points_outside"} & set(report.warnings)


def test_images_are_links_to_the_untouched_originals(data, labelled):
    out, _ = labelled
    for s, w in zip(find_samples(data), find_samples(out)):
        assert w.image_path.is_symlink()
        assert w.image_path.resolve() == s.image_path.resolve()
        assert not s.image_path.is_symlink()
        assert w.image_path.read_bytes() == s.image_path.read_bytes()


def test_copy_writes_identical_files(data, gt_csv, tmp_path):
    before = {s.rel: sha256_file(s.image_path) for s in find_samples(data)}
    pseudo_label(data, tmp_path / "COPY", csv=gt_csv, copy=True)
    written = find_samples(tmp_path / "COPY")
    assert [w.rel for w in written] == list(before)
    for w in written:
        assert not w.image_path.is_symlink() and sha256_file(w.image_path) == before[w.rel]
    assert {s.rel: sha256_file(s.image_path) for s in find_samples(data)} == before


def test_record(data, gt_csv, labelled):
    out, result = labelled
    record = json.loads((out / PSEUDO_RECORD).read_text())
    assert result.record == str(out / PSEUDO_RECORD)
    assert record == {"format": 1, "source": {"csv": str(gt_csv.resolve()), "sha256": sha256_file(gt_csv)},
                      "images": 4, "classes": list(CLASSES), "confidence": None, "dropped_images": [],
                      "dropped_classes": {}, "min_confidence": None}
    assert read_pseudo_record(out) == record
    assert read_pseudo_record(out / "train") == record  # from the split folder too
    assert read_pseudo_record(data) is None


def test_malformed_record_is_an_error(tmp_path):
    (tmp_path / PSEUDO_RECORD).write_text(json.dumps({"format": 1, "dropped_images": [],
                                                      "dropped_classes": {"a.png": ["not-a-bone"]}}))
    with pytest.raises(TwostageError, match="dropped_classes"):
        read_pseudo_record(tmp_path)


def test_csv_rows_of_other_images_are_ignored(data, gt_csv, tmp_path):
    csv = tmp_path / "more.csv"
    rows = read_csv(gt_csv)
    write_csv(csv, [*((n, [r[c] for c in CLASSES]) for n, r in rows.items()), ("elsewhere.png", [""] * len(CLASSES))])
    result = pseudo_label(data, tmp_path / "OUT", csv=csv)
    assert result.ignored_csv_images == ["elsewhere.png"] and result.images == 4


# --------------------------------------------------------------------------- confidence

def test_class_confidence():
    p = np.full((4, 10, 10), 0.2, np.float32)
    p[0, :2] = 0.9                       # 20 positive pixels at 0.9, the rest ignored
    p[1, 0, 0] = 0.3                     # nothing positive: 1 - max = 0.7
    p[2, 0, :4] = [0.5, 0.7, 0.49, 0.6]  # p >= 0.5 counts: mean(0.5, 0.7, 0.6)
    p[3] = 0.0                           # surely absent
    assert np.allclose(class_confidence(p), [0.9, 0.7, 0.6, 1.0])


@pytest.fixture(scope="module")
def chain_run(data, make_tiny_checkpoint, tmp_path_factory) -> dict:
    """A tiny global checkpoint; `infer --save-probs` of it; pseudo-label of it without a threshold."""
    from twostage.inference.infer import infer

    base = tmp_path_factory.mktemp("chain")
    ckpt = make_tiny_checkpoint(base / "g.pt", "global")
    infer(data, ckpt, base / "pred.csv", save_probs=base / "probs")
    result = pseudo_label(data, base / "ALL", global_ckpt=ckpt)
    return {"ckpt": ckpt, "csv": base / "pred.csv", "probs": base / "probs", "out": base / "ALL", "result": result,
            "record": read_pseudo_record(base / "ALL")}


def test_checkpoint_confidence_is_that_of_the_probabilities(data, chain_run):
    record = chain_run["record"]
    assert record["source"]["global"] == str(chain_run["ckpt"].resolve()) and record["source"]["fuse"] is False
    assert record["source"]["global_sha256"] == sha256_file(chain_run["ckpt"])
    assert record["min_confidence"] is None and not record["dropped_classes"] and not record["dropped_images"]
    predicted = read_csv(chain_run["csv"])
    for s in find_samples(data):
        classes, p = read_probs(chain_run["probs"] / probs_file_name(s.name))
        assert classes == list(CLASSES)
        conf = record["confidence"][s.rel]
        assert np.allclose([conf["classes"][c] for c in CLASSES], class_confidence(p), atol=0.01)
        assert conf["image"] == pytest.approx(np.mean(list(conf["classes"].values())), abs=1e-5)
        # the masks are those `infer` writes for the same checkpoint
        written = next(w for w in find_samples(chain_run["out"]) if w.rel == s.rel)
        back = rasterize(read_annotations(written.json_path), p.shape[1:])
        assert np.array_equal(back, np.stack([decode(predicted[s.name][c], p.shape[1:]) for c in CLASSES]))


def test_fused_pseudo_labels_are_the_masks_infer_fuse_writes(data, chain_run, make_tiny_checkpoint, tmp_path):
    from twostage.classes import PALM_CLASSES
    from twostage.inference.infer import infer

    palm = make_tiny_checkpoint(tmp_path / "p.pt", "palm", classes=PALM_CLASSES)
    infer(data, chain_run["ckpt"], tmp_path / "fused.csv", palm_ckpt=palm, fuse=True)
    pseudo_label(data, tmp_path / "OUT", global_ckpt=chain_run["ckpt"], palm_ckpt=palm, fuse=True)
    source = read_pseudo_record(tmp_path / "OUT")["source"]
    assert source["fuse"] is True and source["palm"] == str(palm.resolve()) and source["palm_sha256"] == sha256_file(palm)
    predicted = read_csv(tmp_path / "fused.csv")
    for w in find_samples(tmp_path / "OUT"):
        back = rasterize(read_annotations(w.json_path), (SIZE, SIZE))
        assert np.array_equal(back, np.stack([decode(predicted[w.name][c], (SIZE, SIZE)) for c in CLASSES]))


def _threshold(record: dict) -> float:
    """Between the two most confident images: one image kept, with some classes below it."""
    best = sorted(v["image"] for v in record["confidence"].values())
    assert best[-1] - best[-2] > 1e-3  # else the test data cannot tell kept from dropped
    return round((best[-1] + best[-2]) / 2, 6)


@pytest.mark.parametrize("source", ["checkpoint", "csv+probs"])
def test_min_confidence_drops_classes_and_images(data, chain_run, tmp_path, source):
    record = chain_run["record"]
    t = _threshold(record)
    out = tmp_path / "OUT"
    if source == "checkpoint":
        result = pseudo_label(data, out, global_ckpt=chain_run["ckpt"], min_confidence=t)
    else:
        result = pseudo_label(data, out, csv=chain_run["csv"], probs=chain_run["probs"], min_confidence=t)
    got = read_pseudo_record(out)
    assert got["min_confidence"] == t and got["images"] == result.images == 1
    assert got["source"].get("probs") == (None if source == "checkpoint" else str(chain_run["probs"].resolve()))
    expect_dropped = sorted(rel for rel, v in record["confidence"].items() if v["image"] < t)
    assert len(expect_dropped) == 3 and got["dropped_images"] == result.dropped_images == expect_dropped
    written = find_samples(out)
    assert [w.rel for w in written] == sorted(set(record["confidence"]) - set(expect_dropped))
    assert not any((out / "train" / "DCM" / rel).exists() for rel in expect_dropped)
    (kept,) = written
    low = [c for c in CLASSES if record["confidence"][kept.rel]["classes"][c] < t]
    assert low and len(low) < len(CLASSES)
    assert got["dropped_classes"] == result.dropped_classes == {kept.rel: low}
    labels = {a.label for a in read_annotations(kept.json_path)}
    assert not labels & set(low)
    full = next(w for w in find_samples(chain_run["out"]) if w.rel == kept.rel)
    assert labels == {a.label for a in read_annotations(full.json_path)} - set(low)  # the rest kept
    assert check_dataset(out).ok


def test_a_failure_midway_leaves_nothing(data, chain_run, tmp_path):
    """The last image's probabilities have the wrong size: found while writing, after the first
    images went into the temporary folder; no OUT and no temporary folder remain."""
    probs = tmp_path / "probs"
    shutil.copytree(chain_run["probs"], probs)
    last = probs / probs_file_name(find_samples(data)[-1].name)
    classes, p = read_probs(last)
    write_probs(last, torch.from_numpy(p[:, :64, :64].copy()), classes)
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(TwostageError, match="probabilities of 64x64"):
        pseudo_label(data, parent / "OUT", csv=chain_run["csv"], probs=probs)
    assert list(parent.iterdir()) == []


# --------------------------------------------------------------------------- one-line errors

def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("pseudo-label", *args, env={"OMP_NUM_THREADS": "1"}, timeout=120)


def _bad_csvs(gt_csv: Path, folder: Path) -> dict[str, Path]:
    rows = read_csv(gt_csv)
    first = sorted(rows)[:2]
    partial = folder / "partial.csv"
    write_csv(partial, [(n, [rows[n][c] for c in CLASSES]) for n in first])
    bad_rle = folder / "bad_rle.csv"
    write_csv(bad_rle, [(n, [rows[n][c] if c != "Lunate" else "5 x" for c in CLASSES]) for n in rows])
    header = folder / "header.csv"
    header.write_text("image,class\n")
    return {"partial": partial, "bad_rle": bad_rle, "header": header}


def test_bad_inputs_are_one_line_errors_and_write_nothing(data, gt_csv, tmp_path):
    """As a user runs it: `python -m twostage pseudo-label`, exit code 2, nothing written."""
    csvs = _bad_csvs(gt_csv, tmp_path)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    out = tmp_path / "OUT"
    for args, message in [
        (["--csv", str(csvs["partial"])], "no rows for 2 of the 4 image(s)"),
        (["--csv", str(csvs["bad_rle"])], "class Lunate: RLE value 'x' is not an integer"),
        (["--csv", str(gt_csv), "--min-confidence", "1.5"], "between 0 and 1"),
        (["--csv", str(gt_csv), "--min-confidence", "0.5"], "needs probabilities"),
    ]:
        r = _cli(str(data), "--out", str(out), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert_one_line_error(r, message)
        assert not out.exists(), args
    r = _cli(str(data), "--out", str(full), "--csv", str(gt_csv))
    assert r.returncode == 2
    assert_one_line_error(r, f"{full}: folder is not empty")
    assert [p.name for p in full.iterdir()] == ["keep.txt"] and (full / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_rle.csv", "full", "header.csv", "partial.csv"]


@pytest.mark.parametrize("args, message", [
    (["--csv", "{header}"], "header is"),
    (["--csv", "{gt}", "--min-confidence", "0"], "between 0 and 1"),
    (["--csv", "{gt}", "--min-confidence", "nan"], "between 0 and 1"),
    (["--global", "{ckpt}", "--probs", "{probs}"], "--probs goes with --csv"),
    (["--csv", "{gt}", "--tta", "hflip"], "apply to checkpoints"),
    (["--csv", "{gt}", "--palm", "{ckpt}"], "apply to checkpoints (--global), not --csv"),
    (["--global", "{ckpt}", "--fuse"], "--fuse needs a palm checkpoint"),
    (["--csv", "{gt}", "--probs", "{missing}"], "no such probabilities folder"),
])
def test_more_bad_inputs_through_the_cli(data, gt_csv, chain_run, tmp_path, capsys, args, message):
    """The same one-line errors through `cli.main` in this process (no interpreter start each)."""
    from twostage.cli import main

    paths = {"header": _bad_csvs(gt_csv, tmp_path)["header"], "gt": gt_csv, "ckpt": chain_run["ckpt"],
             "probs": chain_run["probs"], "missing": tmp_path / "nowhere"}
    out = tmp_path / "OUT"
    assert main(["pseudo-label", str(data), "--out", str(out), *(a.format(**paths) for a in args)]) == 2
    assert_one_line_error(capsys.readouterr().err, message)
    assert not out.exists()


def test_cli_writes_the_dataset_and_says_so(data, gt_csv, tmp_path, capsys):
    from twostage.cli import main

    out = tmp_path / "OUT"
    assert main(["pseudo-label", str(data), "--out", str(out), "--csv", str(gt_csv), "--copy"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 4 image(s)" in printed and f"record: {out / PSEUDO_RECORD}" in printed
    assert len(find_samples(out)) == 4 and not find_samples(out)[0].image_path.is_symlink()
