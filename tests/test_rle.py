"""RLE encoder/decoder against the competition formula, and the submission CSV writer/reader (docs/DESIGN.md §2)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.errors import TwostageError
from twostage.rle import CsvWriter, decode, encode, encode_masks, read_csv, write_csv


def reference_rle(mask: np.ndarray) -> str:
    """The competition's encoder, verbatim."""
    pixels = mask.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def polygon_masks(rng: np.random.Generator, c: int, h: int, w: int) -> np.ndarray:
    """Realistic masks: one filled random polygon per class, some classes empty."""
    masks = np.zeros((c, h, w), np.uint8)
    for i in range(c):
        if rng.uniform() < 0.2:
            continue
        pts = rng.integers(0, [w, h], size=(rng.integers(3, 12), 2)).astype(np.int32)
        cv2.fillPoly(masks[i], [cv2.convexHull(pts)], 1)
    return masks


def edge_masks() -> list[np.ndarray]:
    out = [np.zeros((5, 7), np.uint8), np.ones((5, 7), np.uint8), np.ones((1, 1), np.uint8),
           np.zeros((1, 1), np.uint8)]
    for h, w in [(1, 9), (9, 1), (7, 5), (13, 11)]:
        for flat_index in (0, h * w - 1):
            m = np.zeros(h * w, np.uint8)
            m[flat_index] = 1
            out.append(m.reshape(h, w))
        out.append((np.arange(h * w) % 2).astype(np.uint8).reshape(h, w))  # alternating pixels
    return out


def test_encode_matches_reference_on_edge_cases():
    for m in edge_masks():
        assert encode(m) == reference_rle(m), m
        assert (decode(encode(m), m.shape) == m).all()


def test_known_strings():
    m = np.zeros((3, 4), np.uint8)
    assert encode(m) == ""
    m[0, 0] = 1
    m[1, 2:] = 1
    m[2, 3] = 1
    assert encode(m) == "1 1 7 2 12 1"
    assert encode(np.ones((3, 4), bool)) == "1 12"


@pytest.mark.parametrize("seed", range(5))
def test_encode_masks_matches_reference_random(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        c, h, w = rng.integers(1, 6), rng.integers(1, 40), rng.integers(1, 40)
        masks = (rng.uniform(size=(c, h, w)) < rng.uniform()).astype(np.uint8)
        expected = [reference_rle(m) for m in masks]
        assert encode_masks(masks) == expected
        for m, s in zip(masks, expected):
            assert (decode(s, (h, w)) == m).all()


@pytest.mark.parametrize("convert", [
    lambda m: m.astype(bool),
    lambda m: m,
    lambda m: m * 255,
    lambda m: m.astype(np.int64),
    lambda m: m.astype(np.float32),
    lambda m: torch.from_numpy(m),
    lambda m: torch.from_numpy(m).bool(),
    lambda m: torch.from_numpy(m).float(),
    lambda m: torch.from_numpy(m).permute(0, 2, 1).contiguous().permute(0, 2, 1),  # non-contiguous
], ids=["bool", "uint8", "uint8x255", "int64", "float32", "torch_uint8", "torch_bool", "torch_float",
        "torch_strided"])
def test_encode_masks_dtypes_match_reference(convert):
    rng = np.random.default_rng(1)
    masks = polygon_masks(rng, 29, 96, 80)
    masks[3] = 1  # full channel beside empty ones: runs must not leak across channels
    masks[4, -1, -1] = 1
    masks[5, 0, 0] = 1
    assert encode_masks(convert(masks)) == [reference_rle(m) for m in masks]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encode_masks_cuda_matches_reference():
    masks = polygon_masks(np.random.default_rng(2), 29, 256, 256)
    assert encode_masks(torch.from_numpy(masks).cuda()) == [reference_rle(m) for m in masks]
    probs = torch.from_numpy(soft_probs(np.random.default_rng(5), 29, 256, 256))
    thr = torch.linspace(0.05, 0.95, 29)
    assert encode_masks(probs.cuda(), thr.cuda()) == encode_masks(probs, thr)


def test_round_trip_realistic_odd_size():
    rng = np.random.default_rng(3)
    masks = polygon_masks(rng, 29, 131, 257)
    rles = encode_masks(masks)
    assert rles == [reference_rle(m) for m in masks]
    back = np.stack([decode(s, masks.shape[1:]) for s in rles])
    assert back.dtype == np.uint8 and (back == masks).all()


def test_decode_accepts_touching_runs_and_extra_whitespace():
    assert decode(" 1 2  3 1\n", (1, 5)).tolist() == [[1, 1, 1, 0, 0]]


def test_encode_rejects_wrong_rank():
    with pytest.raises(ValueError):
        encode(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_masks(np.zeros((3, 4), np.uint8))


@pytest.mark.parametrize("rle, words", [
    ("1 2 3", "odd number"),
    ("1 x", "not an integer"),
    ("1.5 2", "not an integer"),
    ("0 3", "1-based"),
    ("1 0", "length 0"),
    ("1 -2", "length -2"),
    ("10 8", "ends beyond"),
    ("17 1", "ends beyond"),
    ("5 2 1 2", "overlaps or precedes"),
    ("1 3 3 1", "overlaps or precedes"),
    ("99999999999999999999999 1", "out of range"),
])
def test_decode_errors_say_what_is_wrong(rle, words):
    with pytest.raises(TwostageError, match=words):
        decode(rle, (4, 4))


def test_decode_last_pixel_is_in_range():
    assert decode("16 1", (4, 4))[3, 3] == 1


# ----------------------------------------------------------------------------- CSV

def test_csv_writer_header_order_and_rows(tmp_path):
    path = tmp_path / "pred.csv"
    rows = [("a.png", [f"{i + 1} 1" for i in range(29)]), ("b.png", [""] * 29)]
    with CsvWriter(path) as w:
        for name, rles in rows:
            w.add(name, rles)
    lines = path.read_text().split("\n")
    assert lines[0] == "image_name,class,rle"
    assert lines[-1] == "" and len(lines) == 2 + 2 * 29  # header + 58 rows + final newline
    assert lines[1] == "a.png,finger-1,1 1"
    assert [ln.split(",")[1] for ln in lines[1:30]] == list(CLASSES)
    assert lines[30] == "b.png,finger-1,"
    assert b"\r" not in path.read_bytes()
    back = read_csv(path)
    assert list(back) == ["a.png", "b.png"]
    assert back["a.png"]["Ulna"] == "29 1"
    assert back["b.png"]["Lunate"] == ""  # empty field is "", not NaN


def test_csv_writer_refuses_repeated_image_and_wrong_count(tmp_path):
    path = tmp_path / "pred.csv"
    with pytest.raises(TwostageError, match="added twice"):
        with CsvWriter(path) as w:
            w.add("a.png", [""] * 29)
            w.add("a.png", [""] * 29)
    assert not path.exists()
    with pytest.raises(TwostageError, match="28 RLEs"):
        write_csv(path, [("a.png", [""] * 28)])
    assert list(tmp_path.iterdir()) == []


def test_csv_writer_is_atomic(tmp_path):
    path = tmp_path / "pred.csv"
    write_csv(path, [("old.png", ["1 1"] * 29)])
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with CsvWriter(path) as w:
            w.add("new.png", [""] * 29)
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pred.csv"]  # no temp files left


def test_csv_subset_of_classes(tmp_path):
    path = tmp_path / "palm.csv"
    write_csv(path, [("a.png", ["1 2"] * 8)], classes=PALM_CLASSES)
    assert list(read_csv(path)["a.png"]) == list(PALM_CLASSES)


@pytest.mark.parametrize("text, words", [
    ("", "empty file"),
    ("name,class,rle\n", ":1: header"),
    ("image_name,class,rle\na.png,Ulna\n", ":2: 2 fields"),
    ("image_name,class,rle\na.png,Ulna,1 1\na.png,Ulna,\n", ":3: second row"),
])
def test_read_csv_errors_name_file_and_line(tmp_path, text, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TwostageError, match=words) as e:
        read_csv(path)
    assert "bad.csv" in str(e.value)


def test_read_csv_unreadable(tmp_path):
    with pytest.raises(TwostageError, match="cannot read"):
        read_csv(tmp_path / "missing.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TwostageError, match="UTF-8"):
        read_csv(tmp_path / "bin.csv")


def soft_probs(rng: np.random.Generator, c: int, h: int, w: int) -> np.ndarray:
    """Blurred polygon masks: probabilities with empty stretches, ramps and exact threshold ties."""
    masks = polygon_masks(rng, c, h, w).astype(np.float32)
    probs = np.stack([cv2.GaussianBlur(m, (7, 7), 0) for m in masks])
    probs[0, ::3] = 0.5  # ties at the 0.5 threshold: not foreground (strict >)
    probs[1, 0, 0] = probs[1, -1, -1] = 0.9  # first and last pixel foreground
    return probs


@pytest.mark.parametrize("block", [7, 64, 1 << 17])
@pytest.mark.parametrize("convert", [
    lambda a: a, lambda a: torch.from_numpy(a), lambda a: a.astype(np.float16),
    lambda a: torch.from_numpy(a).to(torch.bfloat16), lambda a: torch.from_numpy(a).to(torch.float64),
], ids=["numpy", "torch", "numpy_fp16", "torch_bf16", "torch_fp64"])
def test_encode_masks_with_thresholds_equals_binarize_then_encode(convert, block, monkeypatch):
    """Thresholding inside the RLE pass (blocks skipped when below threshold) gives the strings
    of binarize + encode, whatever the block size, dtype and per-class thresholds."""
    from twostage import rle
    from twostage.fusion import binarize

    monkeypatch.setattr(rle, "_CPU_BLOCK", block)
    probs = convert(soft_probs(np.random.default_rng(4), 29, 40, 33))
    thr = torch.linspace(0.05, 0.95, 29)
    thr[0] = 0.5
    as_torch = probs if isinstance(probs, torch.Tensor) else torch.from_numpy(probs)
    expected = encode_masks(binarize(as_torch, thr))
    assert encode_masks(probs, thr) == expected
    assert encode_masks(probs, thr.numpy()) == expected
    assert expected[0] != "" and any(s == "" for s in expected)  # the cases above were exercised


def test_encode_masks_thresholds_nan_and_count(monkeypatch):
    from twostage import rle

    monkeypatch.setattr(rle, "_CPU_BLOCK", 8)
    probs = np.zeros((2, 4, 8), np.float32)
    probs[0, 1, 2:5] = 0.9
    probs[0, 1, 3] = np.nan  # NaN is never foreground, and must not hide the block's foreground
    probs[1, 2, :] = np.nan
    assert encode_masks(probs, [0.5, 0.5]) == ["11 1 13 1", ""]
    with pytest.raises(ValueError, match="3 thresholds for 2 channels"):
        encode_masks(probs, [0.5, 0.5, 0.5])


def test_encode_masks_row_hint_skips_rows_and_checks_shape(monkeypatch):
    """With a row hint (rows that hold no foreground), runs next to skipped rows, at channel
    starts and ends, and across row ends are still exact."""
    from twostage import rle

    monkeypatch.setattr(rle, "_CPU_BLOCK", 5)
    masks = polygon_masks(np.random.default_rng(6), 4, 12, 9).astype(bool)
    masks[0, 0, 0] = masks[0, -1, -1] = True
    masks[1, 3, -1] = masks[1, 4, 0] = True  # a run across a row end
    rows = masks.any(2)
    assert encode_masks(masks, rows=rows) == [reference_rle(m) for m in masks]
    assert (~rows).any() and rows.any()
    assert encode_masks(torch.from_numpy(masks), rows=torch.from_numpy(rows)) == encode_masks(masks)
    with pytest.raises(ValueError, match="row hint"):
        encode_masks(masks, rows=rows[:, :-1])
