"""The phantom dataset: the dataset layout (docs/DESIGN.md §1), valid labels, determinism, geometry and contrast; the variants."""
from __future__ import annotations

import csv
import json
import re

import cv2
import numpy as np
import pytest

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.cli import main
from twostage.data.annotations import rasterize, read_annotations
from twostage.data.layout import find_samples
from twostage.data.synth import VARIANTS, PhantomStyle, render_hand, synthesize
from twostage.errors import TwostageError
from twostage.io.images import read_image

NAME = re.compile(r"^image\d{13}_[LR]\.png$")


@pytest.fixture(scope="module")
def data(make_phantoms):
    return make_phantoms("synth", n=6, size=160, seed=3, test_n=3)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_names_and_metadata(data):
    train = find_samples(data, "train")
    test = find_samples(data, "test")
    assert len(train) == 6 and len(test) == 3
    assert all(s.json_path is not None for s in train)
    assert all(s.json_path is None for s in test)
    assert not (data / "test" / "outputs_json").exists()
    for s in train + test:
        assert NAME.match(s.name), s.name
        assert re.fullmatch(r"ID\d{3}", s.id)
        assert read_image(s.image_path).shape == (160, 160)
    train_ids = {s.id for s in train}
    test_ids = {s.id for s in test}
    assert len(train_ids) == 3 and len(test_ids) == 2 and not train_ids & test_ids
    for pid in train_ids:  # both hands of every training person
        assert sorted(s.name[-5] for s in train if s.id == pid) == ["L", "R"]
    names = [s.name for s in train + test]
    assert len(set(names)) == len(names)
    with open(data / "meta_data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["ID", "age", "sex", "weight", "height"]
    assert sorted(r["ID"] for r in rows) == sorted(train_ids | test_ids)
    # JSON imitates real files: untrustworthy metadata and filename.
    obj = json.loads(train[0].json_path.read_text())
    assert obj["metadata"]["width"] == 2048 and obj["filename"] != train[0].name


def test_annotations_valid(data):
    for s in find_samples(data, "train"):
        anns = read_annotations(s.json_path)
        assert sorted(a.label for a in anns) == sorted(CLASSES)
        for a in anns:
            assert len(a.points) >= 3 and a.points.dtype == np.int32
            assert a.points.min() >= 0 and a.points.max() <= 159
        masks = rasterize(anns, (160, 160))
        assert (masks.reshape(len(CLASSES), -1).sum(1) > 0).all()


def test_deterministic_by_seed(tmp_path):
    a = synthesize(tmp_path / "a", n=3, size=128, seed=7, test_n=1)
    b = synthesize(tmp_path / "b", n=3, size=128, seed=7, test_n=1)
    c = synthesize(tmp_path / "c", n=3, size=128, seed=8, test_n=1)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert len(fa) == 3 + 3 + 1 + 1  # odd n: 2 IDs, the second with a right hand only
    assert [k[-5] for k in fa if k.startswith("train/DCM/ID002/")] == ["R"]
    assert set(fa) != set(fc) and list(fa.values()) != list(fc.values())


def test_carpal_box_fraction_and_size_range():
    fracs = []
    for k in range(10):
        size = (128, 192, 256)[k % 3]
        _, anns = render_hand(np.random.default_rng(k), size, "RL"[k % 2])
        pts = np.concatenate([a.points for a in anns if a.label in PALM_CLASSES])
        fracs.append((pts.max(0) - pts.min(0)).max() / size)
    assert 0.15 <= min(fracs) and max(fracs) <= 0.35, fracs


def test_bone_brighter_than_tissue_brighter_than_background():
    for k in range(4):
        img, anns = render_hand(np.random.default_rng(100 + k), 256, "RL"[k % 2])
        bone = rasterize(anns, img.shape).any(0).astype(np.uint8)
        ring = cv2.dilate(bone, np.ones((9, 9), np.uint8)) - bone  # soft tissue beside bone
        far = cv2.dilate(bone, np.ones((61, 61), np.uint8)) == 0  # background
        assert far.sum() > 500
        b, t, g = img[bone > 0].mean(), img[ring > 0].mean(), img[far].mean()
        assert b > t + 30 and t > g + 20, (b, t, g)
        carpals = rasterize([a for a in anns if a.label in PALM_CLASSES], img.shape).any(0)
        assert img[carpals].mean() > t + 30


def test_left_is_mirrored_right():
    for k in range(3):
        def thumb_minus_little(side):
            _, anns = render_hand(np.random.default_rng(k), 192, side)
            x = {a.label: a.points[:, 0].mean() for a in anns}
            return x["finger-1"] - x["finger-19"]
        assert thumb_minus_little("R") < 0 < thumb_minus_little("L")
    a, _ = render_hand(np.random.default_rng(0), 128, "R")
    b, _ = render_hand(np.random.default_rng(0), 128, "L")
    assert not np.array_equal(a, b)


def test_bad_arguments(tmp_path):
    with pytest.raises(TwostageError, match="n=0"):
        synthesize(tmp_path / "x", n=0, size=128)
    with pytest.raises(TwostageError, match="size=32"):
        synthesize(tmp_path / "x", n=2, size=32)
    with pytest.raises(TwostageError, match="test_n"):
        synthesize(tmp_path / "x", n=2, size=128, test_n=-1)
    with pytest.raises(TwostageError, match="side"):
        render_hand(np.random.default_rng(0), 128, "X")


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(TwostageError, match="not empty"):
        synthesize(out, n=2, size=128)
    synthesize(out, n=2, size=128, overwrite=True)
    assert len(find_samples(out, "train")) == 2


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--n", "2", "--size", "128", "--seed", "1", "--test-n", "1"]) == 0
    assert len(find_samples(out, "train")) == 2 and len(find_samples(out, "test")) == 1
    assert main(["synth", "--out", str(out), "--n", "2", "--size", "128"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "bad"), "--n", "0"]) == 2


# --- phantom variants -------------------------------------------------------------------

def _carpal_stats(img, anns):
    """Mean carpal area (px), fraction of carpal pixels inside two or more carpals,
    bone-minus-adjacent-tissue contrast, background noise (high-pass std), hand axis angle
    (capitate -> middle metacarpal, degrees from vertical) and carpal box side / image side."""
    masks = rasterize(anns, img.shape)
    carpals = masks[[CLASSES.index(c) for c in PALM_CLASSES]].astype(np.int32)
    cover = carpals.sum(0)
    bone = masks.any(0).astype(np.uint8)
    ring = cv2.dilate(bone, np.ones((9, 9), np.uint8)) - bone
    far = cv2.dilate(bone, np.ones((61, 61), np.uint8)) == 0
    f = img.astype(np.float32)
    high = f - cv2.GaussianBlur(f, (0, 0), 2)
    centre = {a.label: a.points.mean(0) for a in anns}
    d = centre["finger-11"] - centre["Capitate"]
    pts = np.concatenate([a.points for a in anns if a.label in PALM_CLASSES])
    return {"area": carpals.sum((1, 2)).mean(), "overlap": (cover > 1).sum() / (cover > 0).sum(),
            "contrast": img[bone > 0].mean() - img[ring > 0].mean(), "noise": high[far].std(),
            "angle": np.degrees(np.arctan2(d[0], -d[1])),
            "fraction": (pts.max(0) - pts.min(0)).max() / img.shape[0]}


def _stats(variant, seeds, size):
    out = [_carpal_stats(*render_hand(np.random.default_rng(s), size, "RL"[s % 2], variant)) for s in seeds]
    return {k: np.array([o[k] for o in out]) for k in out[0]}


def test_default_style_is_the_phantom_as_before(tmp_path):
    plain = _files(synthesize(tmp_path / "plain", n=3, size=128, seed=5, test_n=1))
    assert plain == _files(synthesize(tmp_path / "named", n=3, size=128, seed=5, test_n=1, style="default"))
    assert plain == _files(synthesize(tmp_path / "style", n=3, size=128, seed=5, test_n=1, style=PhantomStyle()))
    assert VARIANTS["default"] == PhantomStyle() and PhantomStyle().changes() == {}


def test_every_variant_renders_and_differs_from_default(tmp_path):
    base = _files(synthesize(tmp_path / "default", n=2, size=128, seed=1))
    assert len(VARIANTS) >= 4
    for name, style in VARIANTS.items():
        if name == "default":
            continue
        assert style.changes(), name
        files = _files(synthesize(tmp_path / name, n=2, size=128, seed=1, style=name))
        assert set(files) == set(base), name  # same seed: same IDs and names
        pngs = [k for k in files if k.endswith(".png")]
        assert all(files[k] != base[k] for k in pngs), name
        for s in find_samples(tmp_path / name, "train"):
            anns = read_annotations(s.json_path)
            assert sorted(a.label for a in anns) == sorted(CLASSES)
            assert (rasterize(anns, (128, 128)).reshape(len(CLASSES), -1).sum(1) > 0).all(), name


def test_small_carpals_are_smaller_and_overlap_more():
    seeds = range(40, 46)
    d, v = _stats("default", seeds, 192), _stats("small-carpals", seeds, 192)
    assert (v["area"] < 0.8 * d["area"]).all(), (v["area"], d["area"])  # 0.8² of the area, about
    assert (v["overlap"] > d["overlap"]).all(), (v["overlap"], d["overlap"])
    assert (v["fraction"] < d["fraction"]).all()


def test_low_contrast_has_less_bone_contrast_and_more_noise():
    seeds = range(50, 54)
    d, v = _stats("default", seeds, 256), _stats("low-contrast", seeds, 256)
    assert (v["contrast"] < 0.8 * d["contrast"]).all(), (v["contrast"], d["contrast"])
    assert (v["noise"] > 1.5 * d["noise"]).all(), (v["noise"], d["noise"])
    np.testing.assert_allclose(v["area"], d["area"])  # same geometry


def test_pose_rotates_and_scales_the_hand_more():
    seeds = range(60, 70)
    d, v = _stats("default", seeds, 128), _stats("pose", seeds, 128)
    assert np.abs(d["angle"]).max() < 20 < np.abs(v["angle"]).max(), (d["angle"], v["angle"])
    assert np.abs(v["angle"]).mean() > 1.8 * np.abs(d["angle"]).mean()
    assert v["fraction"].std() > 1.5 * d["fraction"].std(), (v["fraction"], d["fraction"])


def test_unknown_variant_and_bad_style(tmp_path):
    with pytest.raises(TwostageError, match="unknown; choose one of default, small-carpals"):
        synthesize(tmp_path / "x", n=2, size=128, style="nope")
    assert not (tmp_path / "x").exists()
    with pytest.raises(TwostageError, match="unknown"):
        render_hand(np.random.default_rng(0), 128, "R", "nope")
    with pytest.raises(TwostageError, match="carpal_scale"):
        PhantomStyle(carpal_scale=0)
    with pytest.raises(TwostageError, match="carpal_fraction"):
        PhantomStyle(carpal_fraction=(0.3, 0.2))


def test_cli_variant(tmp_path, capsys):
    out = tmp_path / "lc"
    assert main(["synth", "--out", str(out), "--n", "2", "--size", "128", "--seed", "1",
                 "--variant", "low-contrast"]) == 0
    assert "variant low-contrast" in capsys.readouterr().out
    assert _files(out) == _files(synthesize(tmp_path / "lib", n=2, size=128, seed=1, style="low-contrast"))
    assert main(["synth", "--out", str(tmp_path / "bad"), "--n", "2", "--size", "128", "--variant", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown" in err and "pose" in err and len(err.strip().splitlines()) == 1
