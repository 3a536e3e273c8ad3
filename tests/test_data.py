"""The data layer: image reading, pairing, label fixes, metadata, the mask cache."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import phantom

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.data.annotations import Annotation, rasterize, read_annotations
from twostage.data.fixes import Fixes, load_annotations
from twostage.data.layout import find_samples
from twostage.data.masks import MaskCache, load_masks
from twostage.data.metadata import load_metadata
from twostage.errors import TwostageError
from twostage.io.images import png_size, read_image

EXAMPLE_FIXES = Path(__file__).parent / "data" / "fixes_synth.yaml"


# --------------------------------------------------------------------------- images

def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def test_read_image_one_and_three_channels_agree(tmp_path):
    img = phantom(64)
    one = read_image(_png(tmp_path / "g.png", img))
    three = read_image(_png(tmp_path / "c.png", np.dstack([img] * 3)))
    rgba = read_image(_png(tmp_path / "a.png", np.dstack([img] * 3 + [np.full_like(img, 7)])))
    for out in (one, three, rgba):
        assert out.shape == (64, 64) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, img)


def test_read_image_16bit_scaled_by_dtype_dark_stays_dark(tmp_path):
    dark = np.full((32, 32), 1000, dtype=np.uint16)  # 1.5 % of full scale
    dark[0, 0] = 2000
    out = read_image(_png(tmp_path / "d.png", dark))
    assert out.dtype == np.uint8
    assert out[1, 1] == round(1000 * 255 / 65535) and out.max() < 10  # never stretched to 255
    full = read_image(_png(tmp_path / "f.png", np.full((8, 8), 65535, dtype=np.uint16)))
    assert (full == 255).all()


def test_read_image_corrupt_and_empty_files_are_user_errors(tmp_path):
    good = _png(tmp_path / "g.png", phantom(64))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for p in (bad, empty, tmp_path / "missing.png"):
        with pytest.raises(TwostageError, match=p.name):
            read_image(p)


def test_png_size_reads_header_only(tmp_path):
    p = _png(tmp_path / "r.png", np.zeros((40, 70), np.uint8))
    assert png_size(p) == (40, 70)
    (tmp_path / "x.png").write_bytes(b"not a png at all, just text......")
    with pytest.raises(TwostageError, match="x.png"):
        png_size(tmp_path / "x.png")


# --------------------------------------------------------------------------- layout, JSON

def test_find_samples_pairs_by_path_and_keeps_ids(tiny_dataset):
    train = find_samples(tiny_dataset)
    assert [s.rel for s in train] == sorted(s.rel for s in train) and len(train) == 4
    assert all(s.json_path is not None for s in train)
    assert {s.id for s in train} == {"ID001", "ID002"}
    test = find_samples(tiny_dataset, split="test")
    assert [s.json_path for s in test] == [None]
    anns = read_annotations(train[0].json_path)
    assert [a.label for a in anns] == list(CLASSES) and anns[0].id == "id-0000"


def test_rasterize_keeps_overlapping_classes_independent():
    square = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], np.int32)
    masks = rasterize([Annotation("Lunate", square), Annotation("Capitate", square + 5),
                       Annotation("ring", square), Annotation("Hamate", square[:2])], (64, 64))
    assert masks.shape == (len(CLASSES), 64, 64) and masks.dtype == np.uint8
    lun, cap = masks[CLASSES.index("Lunate")], masks[CLASSES.index("Capitate")]
    assert lun[20, 20] == 1 and cap[20, 20] == 1  # overlap kept in both channels
    assert masks[CLASSES.index("Hamate")].sum() == 0  # 2 points: skipped
    assert masks.sum() == lun.sum() + cap.sum()  # the unknown label drew nothing


# --------------------------------------------------------------------------- fixes

def _fixes(tmp_path: Path, text: str) -> Fixes:
    p = tmp_path / "fixes.yaml"
    p.write_text(text)
    return Fixes.load(p)


def test_fixes_relabel_by_id_index_and_label(tiny_dataset, tmp_path):
    s = find_samples(tiny_dataset)[0]
    fixes = _fixes(tmp_path, f"""
{s.name}:
  relabel:
    - {{id: id-0000, to: finger-2}}
    - {{index: 1, to: finger-3}}
    - {{from: Trapezium, to: Trapezoid}}
    - {{from: Trapezoid, to: Trapezium}}
    - {{id: id-0021, from: Lunate, to: Radius}}
""")
    labels = [a.label for a in load_annotations(s, fixes)]
    assert labels[:2] == ["finger-2", "finger-3"]
    i, j = CLASSES.index("Trapezium"), CLASSES.index("Trapezoid")
    assert (labels[i], labels[j]) == ("Trapezoid", "Trapezium")  # a swap, not a merge
    assert labels[21] == CLASSES[21]  # id-0021 is Capitate, not Lunate: rule does not match
    other = find_samples(tiny_dataset)[1]
    assert [a.label for a in load_annotations(other, fixes)] == list(CLASSES)


def test_fixes_drop_annotations_and_images(tiny_dataset, tmp_path, caplog):
    samples = find_samples(tiny_dataset)
    a, b = samples[0], samples[1]
    fixes = _fixes(tmp_path, f"""
{a.rel}:
  drop: [{{id: id-0003}}, {{label: Pisiform}}, {{label: no-such-label}}]
{Path(b.rel).with_suffix('.json').as_posix()}:
  drop_image: true
""")
    with caplog.at_level(logging.WARNING):
        labels = [x.label for x in load_annotations(a, fixes)]
    assert "finger-4" not in labels and "Pisiform" not in labels and len(labels) == 27
    assert "no-such-label" in caplog.text  # a stale rule is reported, not silently ignored
    assert fixes.drops(b) and not fixes.drops(a)
    assert fixes.keep(samples) == [s for s in samples if s != b]
    with pytest.raises(TwostageError, match="dropped"):
        load_annotations(b, fixes)
    assert fixes.unmatched_keys(samples) == []


@pytest.mark.parametrize("text, match", [
    ("img.png:\n  relabel: [{id: a, to: Lunatee}]\n", r"relabel\[0\]\.to: unknown label 'Lunatee'"),
    ("img.png:\n  relable: []\n", r"img.png: unknown key\(s\) \['relable'\]"),
    ("img.png:\n  drop: [{idx: 3}]\n", r"drop\[0\]: unknown key\(s\) \['idx'\]"),
    ("img.png:\n  relabel: [{id: a}]\n", "needs 'to'"),
    ("img.png:\n  drop: [{}]\n", r"drop\[0\]"),
    ("img.png:\n  drop_image: maybe\n", "drop_image"),
    ("img.png:\n  drop: [{index: -1}]\n", "index"),
    ("img.png: [1, 2]\n", "img.png: expected a mapping"),
    ("- a\n- b\n", "expected a mapping of image name"),
    ("img.png: {drop: [\n", "invalid YAML"),
    ("img.png: {drop_image: true}\nimg.json: {drop_image: true}\n", "listed twice"),
])
def test_bad_fixes_file_names_file_and_key(tmp_path, text, match):
    with pytest.raises(TwostageError, match=match) as e:
        _fixes(tmp_path, text)
    assert "fixes.yaml" in str(e.value)


def test_docstring_example_is_a_valid_fixes_file(tmp_path):
    example = Fixes.__doc__.split("::", 1)[1].split("\n\n    Drop rules")[0]
    fixes = _fixes(tmp_path, "\n".join(line[8:] for line in example.splitlines()))
    assert len(fixes.keys()) == 2


def test_example_fixes_file_for_synthetic_data(tmp_path):
    synth = pytest.importorskip("twostage.data.synth")
    root = synth.synthesize(tmp_path / "syn", n=4, size=128, seed=0)
    fixes = Fixes.load(EXAMPLE_FIXES)
    samples = find_samples(root)
    assert fixes.unmatched_keys(samples) == []
    assert len(fixes.keep(samples)) == 3
    by_name = {s.name: s for s in samples}
    left = load_annotations(by_name["image1661368761715_L.png"], fixes)
    raw = read_annotations(by_name["image1661368761715_L.png"].json_path)
    swap = {"Trapezium": "Trapezoid", "Trapezoid": "Trapezium"}
    assert [a.label for a in left] == [swap.get(a.label, a.label) for a in raw]
    right = load_annotations(by_name["image1668319432151_R.png"], fixes)
    assert "Pisiform" not in {a.label for a in right}


# --------------------------------------------------------------------------- metadata

def test_metadata_csv_join_tolerates_header_case_and_spaces(tiny_dataset):
    (tiny_dataset / "meta_data.csv").write_text(
        " id ,AGE, Sex ,Weight (kg),height\nID001,30,M,70.5,175\n2,41,F,55,160\n\n")
    table = load_metadata(tiny_dataset)
    assert table == {"ID001": {"age": 30, "sex": "M", "weight": 70.5, "height": 175},
                     "ID002": {"age": 41, "sex": "F", "weight": 55, "height": 160}}
    for s in find_samples(tiny_dataset):
        assert table[s.id]["sex"] in ("M", "F")
    assert load_metadata(tiny_dataset / "train") == table  # a split folder finds the root table


def test_metadata_absent_and_bad(tmp_path):
    assert load_metadata(tmp_path) == {}
    (tmp_path / "meta_data.csv").write_text("name,age\nx,3\n")
    with pytest.raises(TwostageError, match="meta_data.csv: no ID column"):
        load_metadata(tmp_path)
    (tmp_path / "meta_data.csv").write_text("ID,age\n1,3\nID001,4\n")
    with pytest.raises(TwostageError, match="ID001 appears twice"):
        load_metadata(tmp_path)


def test_metadata_xlsx_without_openpyxl_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "meta_data.xlsx").write_bytes(b"PK")
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # as if not installed
    with pytest.raises(TwostageError, match="pip install openpyxl"):
        load_metadata(tmp_path)


def test_metadata_xlsx_with_korean_headers(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    sheet = book.active
    for row in (["ID", "나이", "성별", "체중(몸무게)", "키(신장)"], [1, 30, "남", 70, 175]):
        sheet.append(row)
    book.save(tmp_path / "meta_data.xlsx")
    assert load_metadata(tmp_path) == {"ID001": {"age": 30, "sex": "남", "weight": 70, "height": 175}}


# --------------------------------------------------------------------------- mask cache

def test_cache_returns_identical_masks_and_stores_compactly(tiny_dataset, tmp_path):
    s = find_samples(tiny_dataset)[0]
    cache = MaskCache(tmp_path / "cache")
    fresh = load_masks(s)
    first = load_masks(s, cache=cache)
    path = cache.path(s)
    assert path.is_file() and path.stat().st_size < fresh.size / 8
    stamp = path.stat().st_mtime_ns
    again = load_masks(s, cache=cache)
    assert path.stat().st_mtime_ns == stamp  # served from the cache, not rewritten
    for m in (first, again):
        assert m.dtype == np.uint8 and m.shape == (len(CLASSES), 128, 128)
        np.testing.assert_array_equal(m, fresh)
    palm = load_masks(s, classes=PALM_CLASSES, cache=cache)  # class list is part of the key
    np.testing.assert_array_equal(palm, fresh[[CLASSES.index(c) for c in PALM_CLASSES]])


def test_cache_invalidated_when_json_changes(tiny_dataset, tmp_path):
    s = find_samples(tiny_dataset)[0]
    cache = MaskCache(tmp_path / "cache")
    before = load_masks(s, cache=cache)
    obj = json.loads(s.json_path.read_text())
    obj["annotations"][0]["points"] = [[0, 0], [60, 0], [60, 60], [0, 60]]
    s.json_path.write_text(json.dumps(obj))
    after = load_masks(s, cache=cache)
    assert after[0].sum() > before[0].sum()
    np.testing.assert_array_equal(after, load_masks(s))


def test_cache_invalidated_when_fixes_for_the_image_change(tiny_dataset, tmp_path):
    s = find_samples(tiny_dataset)[0]
    cache = MaskCache(tmp_path / "cache")
    plain = load_masks(s, cache=cache)
    fixes = _fixes(tmp_path, f"{s.name}:\n  drop: [{{label: Lunate}}]\n")
    fixed = load_masks(s, fixes=fixes, cache=cache)
    lunate = CLASSES.index("Lunate")
    assert plain[lunate].any() and not fixed[lunate].any()
    fixes = _fixes(tmp_path, f"{s.name}:\n  drop: [{{label: Hamate}}]\n")
    refixed = load_masks(s, fixes=fixes, cache=cache)
    assert refixed[lunate].any() and not refixed[CLASSES.index("Hamate")].any()
    np.testing.assert_array_equal(load_masks(s, cache=cache), plain)


@pytest.mark.parametrize("garbage", [b"", b"not an npz", "truncate", "wrong-arrays"])
def test_corrupt_cache_file_is_rebuilt(tiny_dataset, tmp_path, caplog, garbage):
    s = find_samples(tiny_dataset)[0]
    cache = MaskCache(tmp_path / "cache")
    good = load_masks(s, cache=cache)
    path = cache.path(s)
    if garbage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif garbage == "wrong-arrays":
        np.savez(path.with_suffix(""), key=np.array(cache.key(s, (128, 128), CLASSES, None)),
                 shape=np.array([29, 128, 128]), boxes=np.zeros((3, 4), np.int32), bits=np.zeros(1, np.uint8))
    else:
        path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(load_masks(s, cache=cache), good)
    assert "corrupt mask cache" in caplog.text
    np.testing.assert_array_equal(load_masks(s, cache=cache), good)  # and it was rewritten


def test_cache_roundtrip_with_empty_and_full_classes(tmp_path, write_sample):
    anns = [Annotation("finger-1", np.array([[0, 0], [127, 0], [127, 127], [0, 127]], np.int32)),
            Annotation("Ulna", np.array([[5, 7], [9, 7], [9, 9]], np.int32))]
    write_sample(tmp_path, "ID001/a_R.png", annotations=anns)
    s = find_samples(tmp_path)[0]
    cache = MaskCache(tmp_path / "cache")
    load_masks(s, cache=cache)
    np.testing.assert_array_equal(load_masks(s, cache=cache), rasterize(anns, (128, 128)))


def test_load_masks_of_a_test_image_is_a_user_error(tiny_dataset, tmp_path):
    s = find_samples(tiny_dataset, split="test")[0]
    for cache in (None, MaskCache(tmp_path / "c")):
        with pytest.raises(TwostageError, match="no annotation JSON"):
            load_masks(s, cache=cache)


def test_masks_use_png_size_not_json_metadata(tmp_path, write_sample):
    obj = {"annotations": [{"id": "a", "type": "poly_seg", "attributes": {}, "label": "Lunate",
                            "points": [[1, 1], [50, 1], [50, 50]]}],
           "metadata": {"width": 9999, "height": 3}, "filename": "wrong.png"}
    write_sample(tmp_path, "ID001/x_L.png", image=phantom(96), annotations=obj)
    assert load_masks(find_samples(tmp_path)[0]).shape == (len(CLASSES), 96, 96)
