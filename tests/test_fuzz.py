"""Property-based fuzzing of every reader of user files (hypothesis).

Each test writes what a strategy draws to a real file and reads it with the reader the
commands use. The property: a valid result (checked as its consumers need it) or one
TwostageError whose message names the file; never another exception, never a warning
(warnings are errors here: numpy's cast warnings meant a silent int32 overflow), and an
image is never decoded beyond the pixel limit. Budgets: `budget(n)` examples in the `ci`
profile (fixed seed, what CI runs), 100× that with `--hypothesis-profile=long`
(tests/conftest.py registers both).
"""
from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.errors import TwostageError

LIMIT = 64 * 64
"""The pixel limit while fuzzing ($TWOSTAGE_MAX_PIXELS): declared sizes above it must be refused."""


def budget(ci: int) -> settings:
    """`ci` examples in the ci profile (max_examples 100), scaled with the loaded profile."""
    return settings(max_examples=max(1, ci * settings.default.max_examples // 100))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """One folder per module: every example overwrites its files (hypothesis reruns the test
    body, so function-scoped fixtures would be shared across examples anyway)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TWOSTAGE_MAX_PIXELS", str(LIMIT))
        yield tmp_path_factory.mktemp("fuzz")


def outcome(read, path: Path):
    """`read()`'s result, or the TwostageError it raised, which must name `path`. Any other
    exception or any warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return read()
        except TwostageError as e:
            assert str(path) in str(e), f"the error does not name {path}: {e}"
            return e


# --------------------------------------------------------------------------- JSON-like values

def _numbers() -> st.SearchStrategy:
    """Every kind of number a file can hold: huge, tiny, negative, NaN, inf, beyond float64."""
    return (st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.sampled_from([1e12, -1e15, 1e15, 2**31 - 1, 2**31, -2**31 - 1, 2**63, 10**400, -0.0, 1e-320]))


SCALARS = st.none() | st.booleans() | _numbers() | st.text(max_size=20)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=12)
"""Any JSON value (with NaN, Infinity and integers beyond float64, which Python's json writes)."""


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def mutated_text(text: str) -> st.SearchStrategy[bytes]:
    """`text` as UTF-8, truncated, with a byte flipped, or with invalid UTF-8 spliced in."""
    data = text.encode("utf-8")
    n = len(data)
    return st.one_of(
        st.just(data),
        st.integers(0, n).map(lambda k: data[:k]),
        st.tuples(st.integers(0, max(n - 1, 0)), st.integers(1, 255)).map(
            lambda t: data[:t[0]] + bytes([data[t[0]] ^ t[1]]) + data[t[0] + 1:] if n else data),
        st.integers(0, n).map(lambda k: data[:k] + b"\xff\xfe\xc3" + data[k:]),
    )


def documents(structured: st.SearchStrategy, nasty: list[str]) -> st.SearchStrategy[bytes]:
    """Bytes of a file: a structured object as JSON (JSON is YAML), mutated; any value; raw
    bytes; deep nesting; and the hand-picked `nasty` texts."""
    as_json = st.one_of(structured, structured, VALUES).map(lambda o: json.dumps(o, allow_nan=True))
    return st.one_of(
        as_json.map(str.encode),
        as_json.flatmap(mutated_text),
        as_json.flatmap(mutated_text),
        st.binary(max_size=64),
        st.sampled_from([*nasty, nested(100), nested(100_000)]).map(str.encode),  # deep: ~1 s each in PyYAML
    )


YAML_NASTY = [
    "a: 2001-02-30", "a: 0000-01-01", "a: !!int 'x'", "a: !!int", "a: !!int 08", "a: !!float 'abc'", "a: !!float",
    "a: !!timestamp", "a: !!binary 1", "? [1, 2]\n: 3", "a: &a [*a]",
    "a: " + "9" * 5000, "a: !!set {1, 2}", "a: !!binary AAAA", "\x00", "a: !!python/name:os.system", "- " * 3000 + "x",
    "{" * 3000, "a: .nan", "a: 190:20:30", "---\na: 1\n---\nb: 2",
    # billion laughs: 9 levels of 9 aliases
    "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
]


# --------------------------------------------------------------------------- PNG

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _ihdr(w: int, h: int, depth: int, colour: int, interlace: int = 0) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace))


CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""PNG colour type -> samples per pixel (grey, RGB, palette, grey+alpha, RGBA)."""


@st.composite
def handmade_png(draw) -> bytes:
    """A PNG built chunk by chunk: any colour type and bit depth (also invalid pairs), interlaced
    or not, with or without a palette, image data of the right size or not."""
    colour = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 5, 7]))
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0]))
    w, h = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    row = 1 + (w * CHANNELS.get(colour, 1) * depth + 7) // 8
    size = draw(st.sampled_from([h * row, 0, h * row - 1, h * row + 5]))
    raw = bytes(draw(st.lists(st.integers(0, 255), min_size=size, max_size=size)))
    chunks = [_ihdr(w, h, depth, colour, draw(st.sampled_from([0, 1, 2])))]
    if colour == 3 and draw(st.booleans()):
        chunks.append(_chunk(b"PLTE", bytes(3 * draw(st.integers(1, 256)))))
    chunks.append(_chunk(b"IDAT", zlib.compress(raw)))
    chunks.append(_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


@st.composite
def encoded_png(draw) -> bytes:
    """A valid PNG from OpenCV: 8/16 bit, 1/3/4 channels."""
    import cv2

    dtype = draw(st.sampled_from([np.uint8, np.uint16]))
    shape = (draw(st.integers(1, 16)), draw(st.integers(1, 16))) + draw(st.sampled_from([(), (3,), (4,)]))
    seed = draw(st.integers(0, 2**32 - 1))
    img = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    return cv2.imencode(".png", img)[1].tobytes()


@st.composite
def png_files(draw) -> bytes:
    """A PNG (OpenCV's or hand-made), then at most one damage: truncated, a bit flipped, a chunk
    length overwritten, the declared size replaced (with or without a correct CRC), bytes spliced in."""
    data = draw(st.one_of(encoded_png(), handmade_png()))
    damage = draw(st.sampled_from(["none", "truncate", "flip", "length", "size", "size-crc", "splice"]))
    if damage == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if damage == "flip":
        k = draw(st.integers(0, len(data) - 1))
        return data[:k] + bytes([data[k] ^ (1 << draw(st.integers(0, 7)))]) + data[k + 1:]
    if damage == "length":  # IHDR's (8), or the next chunk's (33), or anywhere
        k = draw(st.sampled_from([8, 33, draw(st.integers(0, max(0, len(data) - 4)))]))
        return data[:k] + struct.pack(">I", draw(st.sampled_from([0, 1, 13, 2**31 - 1, 2**32 - 1]))) + data[k + 4:]
    if damage.startswith("size"):
        side = st.sampled_from([0, 1, 63, 64, 65, 4097, 100_000, 2**31 - 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
        head = data[16:29]
        new = struct.pack(">II", draw(side), draw(side)) + head[8:]
        crc = struct.pack(">I", zlib.crc32(b"IHDR" + new) & 0xFFFFFFFF) if damage == "size-crc" else data[29:33]
        return data[:16] + new + crc + data[33:]
    if damage == "splice":
        k = draw(st.integers(0, len(data)))
        return data[:k] + draw(st.binary(min_size=1, max_size=16)) + data[k:]
    return data


@budget(250)
@given(data=png_files())
@example(data=b"\x89PNG\r\n\x1a\n" + _ihdr(100_000, 100_000, 8, 0) + _chunk(b"IEND", b""))
@example(data=b"")
def test_png(folder, data):
    """read_image: an (H, W) uint8 image of the declared size within the limit, or one error."""
    from twostage.io.images import png_size, read_image, read_image_raw

    path = folder / "image.png"
    path.write_bytes(data)
    img = outcome(lambda: read_image(path), path)
    size = outcome(lambda: png_size(path), path)
    if isinstance(img, TwostageError):
        return
    assert img.dtype == np.uint8 and img.ndim == 2 and img.flags.c_contiguous
    assert img.shape == size and img.size <= LIMIT
    raw = read_image_raw(path)
    assert raw.shape[:2] == img.shape and raw.dtype in (np.uint8, np.uint16)


MEASURE = """
import resource, sys
import cv2
from twostage.errors import TwostageError
from twostage.io.images import read_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_image(sys.argv[1])
except TwostageError:
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("data", [
    # found by the fuzzer (3.5 s for one file): an IDAT declaring 4 GiB, which OpenCV allocated before reading
    bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000110000000006aee4716ffffffff49444154081d63688a07"
                  "00016600e2e9db05970000000049454e44ae426082"),
    b"\x89PNG\r\n\x1a\n" + _ihdr(30_000, 30_000, 16, 6) + _chunk(b"IEND", b""),  # 7.2 GB if decoded
])
def test_png_memory_is_bounded(tmp_path, data):
    """What reading a crafted PNG adds to a fresh process's peak memory (the real decoder, the
    default limit): under 100 MB."""
    import os
    import subprocess
    import sys

    path = tmp_path / "crafted.png"
    path.write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("TWOSTAGE_MAX_PIXELS", None)
    res = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) < 100, f"+{res.stdout.strip()} MB"


@budget(60)
@given(data=encoded_png())
def test_valid_png_is_read(folder, data):
    """Every PNG OpenCV writes within the limit is read, as its first channel scaled to 8 bits."""
    import cv2

    from twostage.io.images import read_image, to_gray8

    path = folder / "valid.png"
    path.write_bytes(data)
    expected = to_gray8(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED))
    assert np.array_equal(read_image(path), expected)


# --------------------------------------------------------------------------- annotation JSON

COORD = _numbers()
POINTS = st.lists(st.lists(COORD, min_size=2, max_size=2), max_size=6) | st.lists(st.lists(COORD, max_size=3), max_size=4)
ANNOTATION = st.fixed_dictionaries(
    {"label": st.sampled_from(CLASSES) | VALUES, "points": POINTS | VALUES},
    optional={"id": VALUES, "type": VALUES, "attributes": VALUES})
ANNOTATIONS = st.fixed_dictionaries({"annotations": st.lists(ANNOTATION | VALUES, max_size=4)},
                                    optional={"metadata": VALUES, "filename": VALUES})


@budget(300)
@given(data=documents(ANNOTATIONS, ['{"annotations": [{"label": "Lunate", "points": [[1e15, 2e12], [0, 0], [5, 5]]}]}',
                                    '{"annotations": [{"label": "Lunate", "points": [[' + "9" * 400 + ', 1]]}]}']))
def test_annotation_json(folder, data):
    """read_annotations: labels and int32 points that rasterising, the training box and the
    prepare-sr mapping take without error or warning; or one error."""
    from twostage.box import BoxRule, box_from_annotations
    from twostage.data.annotations import rasterize, read_annotations
    from twostage.sr.prepare import map_annotations

    path = folder / "image.json"
    path.write_bytes(data)
    anns = outcome(lambda: read_annotations(path), path)
    if isinstance(anns, TwostageError):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for a in anns:
            assert isinstance(a.label, str) and a.points.dtype == np.int32 and a.points.shape[1:] == (2,)
        masks = rasterize(anns, (24, 32))
        assert masks.shape == (len(CLASSES), 24, 32) and masks.max(initial=0) <= 1
        box = box_from_annotations(anns, (24, 32), BoxRule())
        if box is not None:
            for a in map_annotations(anns, box.grown(1.5, (24, 32)), 4):
                assert a.points.dtype == np.int32


@budget(60)
@given(anns=st.lists(st.tuples(st.sampled_from(CLASSES), st.lists(st.tuples(st.integers(-2**31 + 1, 2**31 - 1),
                                                                            st.integers(-2**31 + 1, 2**31 - 1)),
                                                                  max_size=5)), max_size=4))
def test_valid_annotations_are_read(folder, anns):
    """Any integer points within int32 (also far outside the image) are read exactly."""
    from twostage.data.annotations import read_annotations

    path = folder / "valid.json"
    path.write_text(json.dumps({"annotations": [{"label": c, "points": [list(p) for p in pts]} for c, pts in anns]}))
    got = read_annotations(path)
    assert [(a.label, a.points.tolist()) for a in got] == [(c, [list(p) for p in pts]) for c, pts in anns]


# --------------------------------------------------------------------------- YAML files

RULE = st.dictionaries(st.sampled_from(["id", "index", "from", "to", "label", "junk"]),
                       st.sampled_from(CLASSES) | VALUES, max_size=3)
FIXES = st.dictionaries(
    st.sampled_from(["ID001/a.png", "a.png", "a", "b.json", ""]) | st.text(max_size=10),
    st.dictionaries(st.sampled_from(["relabel", "drop", "drop_image", "junk"]),
                    st.lists(RULE, max_size=3) | VALUES, max_size=3) | VALUES, max_size=3)


@budget(150)
@given(data=documents(FIXES, YAML_NASTY))
def test_fixes_yaml(folder, data):
    """Fixes.load: fixes that apply to an image (relabel/drop/digest/keep work), or one error."""
    from twostage.data.annotations import Annotation
    from twostage.data.fixes import Fixes
    from twostage.data.layout import Sample

    path = folder / "fixes.yaml"
    path.write_bytes(data)
    fixes = outcome(lambda: Fixes.load(path), path)
    if isinstance(fixes, TwostageError):
        return
    sample = Sample(folder / "ID001" / "a.png", folder / "ID001" / "a.json", "ID001/a.png")
    anns = [Annotation(c, np.zeros((3, 2), np.int32), f"id-{k}") for k, c in enumerate(CLASSES[:3])]
    out = fixes.apply(sample, anns)
    assert all(a.label in CLASSES for a in out) and len(out) <= len(anns)
    assert isinstance(fixes.digest(sample), str) and len(fixes.keep([sample])) <= 1


def _config_keys() -> list[str]:
    from twostage.config import all_keys

    return all_keys()


CONFIG = st.dictionaries(st.sampled_from(_config_keys() + ["model", "train", "junk", "model.junk"]),
                         VALUES | st.sampled_from(["Unet", "none", "1e-3", [64, 64], 64]), max_size=5)


@budget(150)
@given(data=documents(CONFIG, YAML_NASTY))
def test_config_yaml(folder, data):
    """load_config(config_file=...): a config that validates, saves and reads back the same
    and fits a checkpoint's JSON-safe meta; or one error."""
    from twostage.config import config_from_dict, load_config

    path = folder / "config.yaml"
    path.write_bytes(data)
    cfg = outcome(lambda: load_config(config_file=path), path)
    if isinstance(cfg, TwostageError):
        return
    json.dumps(cfg.to_dict(), allow_nan=False)
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())).to_dict() == cfg.to_dict()


@budget(100)
@given(text=st.text(max_size=30) | st.sampled_from(YAML_NASTY).map(lambda t: "train.seed=" + t))
@example(text="=!!int")
def test_config_override(text):
    """--set KEY=VALUE: a config or one error naming the flag."""
    from twostage.config import load_config

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            load_config(overrides=[text])
        except TwostageError as e:
            assert "--set" in str(e)


PER_CLASS = (st.dictionaries(st.sampled_from([*CLASSES, "default", "Lunat"]) | st.text(max_size=5),
                             st.floats(0, 1) | _numbers() | VALUES, max_size=4)
             | _numbers()).flatmap(lambda v: st.sampled_from([v, {"thresholds": v}, {"fuse_weights": v}]))


@budget(150)
@given(data=documents(PER_CLASS, YAML_NASTY), which=st.sampled_from(["thresholds", "fuse_weights"]))
def test_thresholds_and_weights_yaml(folder, data, which):
    """fusion.thresholds / fuse_weights FILE: 29 values in [0, 1], or one error."""
    from twostage import fusion

    path = folder / f"{which}.yaml"
    path.write_bytes(data)
    values = outcome(lambda: getattr(fusion, which)(path), path)
    if isinstance(values, TwostageError):
        return
    assert values.shape == (len(CLASSES),) and bool(((values >= 0) & (values <= 1)).all())


ENTRY = st.dictionaries(st.sampled_from(["file", "arch", "scale", "url", "sha256", "params", "junk"]),
                        st.sampled_from(["RRDBNet", "SRVGGNetCompact", "x.pth", "0" * 64, 4]) | VALUES, max_size=7)
MANIFEST = st.fixed_dictionaries({"weights": st.dictionaries(st.text(max_size=6), ENTRY | VALUES, max_size=3)})


@budget(100)
@given(manifest=documents(MANIFEST, YAML_NASTY), pins=documents(st.dictionaries(st.text(max_size=6), VALUES), []))
def test_weights_manifest_and_pins(folder, manifest, pins):
    """weights.status (the manifest, then pins.yaml): rows of known states, or one error naming one of them."""
    from twostage.sr import weights

    mpath, ppath = folder / "manifest.yaml", folder / "pins.yaml"
    mpath.write_bytes(manifest)
    ppath.write_bytes(pins)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            rows = weights.status(folder, mpath)
        except TwostageError as e:
            assert str(mpath) in str(e) or str(ppath) in str(e), e
            return
    assert all(r["state"] in ("ok", "missing", "bad", "unpinned") for r in rows)
    for spec in weights.load_manifest(mpath).values():
        assert isinstance(spec.scale, int) and spec.arch in weights.ARCHS and isinstance(spec.params, dict)


# --------------------------------------------------------------------------- the submission CSV

NAMES = st.sampled_from(["a.png", "b.png", 'q"uote.png', "com,ma.png", "cr\r.png", "ff\x0c.png", "ls\u2028.png", ""])
LONG_RLE = " ".join(["1 1"] * 70_000)
"""420 KB: beyond the csv module's default field limit of 128 KiB."""
RLES = st.one_of(
    st.lists(st.integers(1, 40), max_size=6).map(lambda v: " ".join(map(str, v))),
    st.sampled_from(["", "1 2", "0 1", "3 1 1 1", "-1 2", "1 " + "9" * 5000, "1 99999999999999999999", "x y", "1  2 ",
                     LONG_RLE]),
)


@st.composite
def csv_files(draw) -> bytes:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    header = draw(st.sampled_from([["image_name", "class", "rle"], ["image_name", "class"], [" image_name", "class ", "rle"]]))
    writer.writerow(header)
    rows = draw(st.lists(st.tuples(NAMES, st.sampled_from(CLASSES[:3]) | st.text(max_size=4), RLES), max_size=6))
    writer.writerows(rows)
    return draw(mutated_text(buf.getvalue()) if buf.tell() < 4096 else st.just(buf.getvalue().encode()))


@budget(200)
@given(data=csv_files() | st.binary(max_size=64))
def test_submission_csv(folder, data):
    """rle.read_csv and ensemble.CsvIndex: the same rows (or one error each); every RLE decodes
    to a mask of the image or is one error."""
    from twostage.evaluation.ensemble import CsvIndex
    from twostage.rle import decode, read_csv

    path = folder / "pred.csv"
    path.write_bytes(data)
    table = outcome(lambda: read_csv(path), path)
    index = outcome(lambda: CsvIndex(path), path)
    if isinstance(index, CsvIndex) and isinstance(table, dict):
        assert index.order == list(table)
        for name in index.order:
            assert index.rows(name) == table[name]
    for per_image in table.values() if isinstance(table, dict) else ():
        for rle in per_image.values():
            try:
                assert decode(rle, (7, 9)).shape == (7, 9)
            except TwostageError:
                pass


@budget(60)
@given(rows=st.lists(st.tuples(NAMES, st.sampled_from(CLASSES), RLES), max_size=5, unique_by=lambda r: r[:2]))
def test_valid_csv_is_read_back(folder, rows):
    """What `rle.write_csv` writes (any image name without a line break, RLEs of any length) both
    readers read back exactly."""
    from twostage.evaluation.ensemble import CsvIndex
    from twostage.rle import read_csv, write_csv

    path = folder / "valid.csv"
    table: dict[str, dict[str, str]] = {}
    for name, cls, rle in rows:
        table.setdefault(name, {c: "" for c in CLASSES})[cls] = rle
    if any("\r" in name for name in table):  # a row csv cannot quote: refused when written
        with pytest.raises(TwostageError, match="line break"):
            write_csv(path, [(name, [per[c] for c in CLASSES]) for name, per in table.items()])
        return
    write_csv(path, [(name, [per[c] for c in CLASSES]) for name, per in table.items()])
    assert read_csv(path) == table
    if table:
        index = CsvIndex(path)
        assert {name: index.rows(name) for name in index.order} == table


# --------------------------------------------------------------------------- saved probabilities

@st.composite
def probs_files(draw, folder: Path) -> bytes:
    import io

    from twostage.inference.probs import write_probs

    c = draw(st.sampled_from([1, 8, 29]))
    classes = list(CLASSES[:c]) if c != 8 else list(PALM_CLASSES)
    shape = (c, draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    kind = draw(st.sampled_from(["valid", "truncate", "flip", "arrays", "object"]))
    if kind in ("arrays", "object"):
        buf = io.BytesIO()
        arrays = {"probs": draw(st.sampled_from([np.zeros(shape, np.float64), np.zeros(shape[1:], np.uint8),
                                                 np.zeros((30, 2, 2), np.uint8), np.zeros((1, 200, 200), np.uint8)])),
                  "classes": draw(st.sampled_from([np.array(classes), np.array(classes[:-1] + ["x", "y"]),
                                                   np.arange(c)]))}
        if kind == "object":
            arrays["probs"] = np.array([None, 1], dtype=object)
        np.savez(buf, **draw(st.sampled_from([arrays, {"probs": arrays["probs"]}])))
        return buf.getvalue()
    path = folder / "source.npz"
    write_probs(path, torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))), classes)
    data = path.read_bytes()
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        k = draw(st.integers(0, len(data) - 1))
        return data[:k] + bytes([data[k] ^ 0xFF]) + data[k + 1:]
    return data


@budget(200)
@given(data=st.data())
def test_saved_probabilities(folder, data):
    """read_probs / probs_classes: (C, H, W) float32 in [0, 1] with C class names, or one error."""
    from twostage.inference.probs import probs_classes, read_probs

    path = folder / "image.npz"
    path.write_bytes(data.draw(probs_files(folder) | st.binary(max_size=64)))
    got = outcome(lambda: read_probs(path), path)
    names = outcome(lambda: probs_classes(path), path)
    if isinstance(got, TwostageError):
        return
    classes, probs = got
    assert names == classes and probs.dtype == np.float32 and probs.shape[0] == len(classes)
    assert probs.shape[1] * probs.shape[2] <= LIMIT and probs.min() >= 0 and probs.max() <= 1


@budget(40)
@given(c=st.sampled_from([1, 8, 29]), h=st.integers(1, 64), w=st.integers(1, 64), seed=st.integers(0, 99))
def test_valid_probabilities_are_read(folder, c, h, w, seed):
    """What `write_probs` writes (H·W within the limit) reads back within 1/510."""
    from twostage.inference.probs import read_probs, write_probs

    probs = torch.rand((c, h, w), generator=torch.Generator().manual_seed(seed))
    path = folder / "valid.npz"
    write_probs(path, probs, CLASSES[:c])
    classes, got = read_probs(path)
    assert classes == list(CLASSES[:c]) and np.abs(got - probs.numpy()).max() <= 1 / 510 + 1e-6


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def checkpoint_bytes(folder, make_tiny_checkpoint) -> bytes:
    return make_tiny_checkpoint(folder / "valid.pt", "palm", classes=PALM_CLASSES).read_bytes()


META_FIELDS = ["stage", "classes", "model", "input_size", "normalization", "box_rule", "palm_set"]
TENSORISH = VALUES | st.sampled_from([torch.zeros(2), {"w": torch.ones(1)}, [torch.zeros(1)]])


@budget(40)
@given(data=st.data())
def test_checkpoint(folder, checkpoint_bytes, data):
    """load_checkpoint, then Predictor.from_checkpoint (which rebuilds the network from the
    meta): a usable predictor, or one error (naming the file where the loader gives it)."""
    from twostage.checkpoint import load_checkpoint
    from twostage.models import Predictor

    path = folder / "model.pt"
    kind = data.draw(st.sampled_from(["meta", "meta", "structure", "truncate", "flip", "bytes"]))
    if kind in ("meta", "structure"):
        obj = torch.load(folder / "valid.pt", weights_only=True)
        if kind == "meta":
            field = data.draw(st.sampled_from(META_FIELDS))
            sub = data.draw(st.sampled_from([None, "arch", "encoder", "in_channels", "kwargs", "mean", "std",
                                             "upscaler", "scale", "margin", "fallback"]))
            target = obj["meta"].get(field)
            if isinstance(target, dict) and sub is not None:
                target[sub] = data.draw(TENSORISH)
            else:
                obj["meta"][field] = data.draw(TENSORISH)
        else:
            obj[data.draw(st.sampled_from(["format", "state_dict", "meta"]))] = data.draw(TENSORISH)
        torch.save(obj, path)
    elif kind == "truncate":
        path.write_bytes(checkpoint_bytes[:data.draw(st.integers(0, len(checkpoint_bytes) - 1))])
    elif kind == "flip":
        k = data.draw(st.integers(0, len(checkpoint_bytes) - 1))
        path.write_bytes(checkpoint_bytes[:k] + bytes([checkpoint_bytes[k] ^ 0xFF]) + checkpoint_bytes[k + 1:])
    else:
        path.write_bytes(data.draw(st.binary(max_size=64)))
    ckpt = outcome(lambda: load_checkpoint(path), path)
    if isinstance(ckpt, TwostageError):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            predictor = Predictor.from_checkpoint(path)
        except TwostageError:
            return
    probs = predictor.probs(torch.zeros(1, 40, 40, dtype=torch.uint8))
    assert probs.shape == (1, len(predictor.classes), 40, 40)


@pytest.mark.parametrize("field,value", [
    ("box_rule", torch.zeros(2)),  # found by the long profile: a tensor's truth value is ambiguous
    ("palm_set", torch.zeros(2)),
    ("model", {"arch": "Unet", "encoder": "resnet18", "in_channels": 10**6}),  # would build a 12 GB conv
    ("normalization", {"mean": [0.5], "std": [0]}),
    ("input_size", [64, "64"]),
])
def test_checkpoint_meta_of_the_wrong_kind(folder, checkpoint_bytes, field, value):
    from twostage.checkpoint import load_checkpoint

    obj = torch.load(folder / "valid.pt", weights_only=True)
    obj["meta"][field] = value
    path = folder / "wrong.pt"
    torch.save(obj, path)
    with pytest.raises(TwostageError, match=f"^{path}: not a usable twostage checkpoint"):
        load_checkpoint(path)


@st.composite
def weight_files(draw, folder: Path) -> bytes:
    """A Real-ESRGAN-style file ({"params_ema": state dict}) holding any values, damaged or not."""
    path = folder / "source.pth"
    torch.save(draw(st.fixed_dictionaries({draw(st.sampled_from(["params_ema", "params", "w"])): TENSORISH})), path)
    data = path.read_bytes()
    return data[:draw(st.integers(0, len(data)))]


@budget(60)
@given(data=st.data())
def test_weights_file(folder, data):
    """weights.load_state_dict of any bytes: {name: tensor}, or one error naming the file."""
    from twostage.sr.weights import load_state_dict

    path = folder / "weights.pth"
    path.write_bytes(data.draw(weight_files(folder) | st.binary(max_size=64)))
    got = outcome(lambda: load_state_dict(path), path)
    if not isinstance(got, TwostageError):
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in got.items())


# --------------------------------------------------------------------------- run files

SPLIT = st.fixed_dictionaries({"folds": st.dictionaries(st.sampled_from(["ID001", "ID002"]) | st.text(max_size=3),
                                                        st.integers(0, 4) | VALUES, max_size=3),
                               "n_folds": st.sampled_from([5, 2]) | VALUES})


@budget(100)
@given(data=documents(SPLIT, []))
def test_split_file(folder, data):
    """The split file: a fold (int) per ID, or one error."""
    from twostage.train.split import load_or_create_split

    path = folder / "split.json"
    path.write_bytes(data)
    assign = outcome(lambda: load_or_create_split(path, ["ID001", "ID002"], 5, 0), path)
    if not isinstance(assign, TwostageError):
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in assign.values())


RECORD = st.fixed_dictionaries({"format": st.just("twostage-palmset-1") | VALUES,
                                "box_rule": st.dictionaries(st.sampled_from(["margin", "side_min", "side_max", "fallback"]),
                                                            st.floats(0, 1) | st.lists(st.floats(0, 1), max_size=3) | VALUES,
                                                            max_size=4) | VALUES})


@budget(100)
@given(data=documents(RECORD, []))
def test_palm_set_record(folder, data):
    """palmset.json, as palm training reads it: a record whose box rule builds, or one error."""
    from twostage.box import BoxRule
    from twostage.data.palm_set import load_palm_set

    (folder / "palmset.json").write_bytes(data)
    rec = outcome(lambda: load_palm_set(folder), folder / "palmset.json")
    if isinstance(rec, TwostageError):
        return
    try:
        BoxRule.from_dict(rec.get("box_rule"))
    except TwostageError:
        pass


@budget(100)
@given(data=st.data())
def test_calibration_record(folder, data):
    """calibration.json (sha256 of the pair right or wrong): values the chain can use, None, or one error."""
    from twostage import fusion
    from twostage.inference.calibration import find_calibration
    from twostage.io.files import sha256_file

    g, p = folder / "g.pt", folder / "p.pt"
    g.write_bytes(b"global")
    p.write_bytes(b"palm")
    sha = data.draw(st.sampled_from([{"global_sha256": sha256_file(g), "palm_sha256": sha256_file(p)}, {}]))
    record = st.fixed_dictionaries({"thresholds": PER_CLASS, "fuse_weights": PER_CLASS,
                                    **{k: st.just(v) for k, v in sha.items()}})
    path = folder / "calibration.json"
    path.write_bytes(data.draw(documents(record, YAML_NASTY)))
    found = outcome(lambda: find_calibration(g, p, path), path)
    if isinstance(found, dict):
        fusion.thresholds(found["thresholds"])
        fusion.fuse_weights(found["fuse_weights"])


METADATA = st.lists(st.lists(SCALARS.map(str), min_size=1, max_size=4), max_size=4).map(
    lambda rows: "\n".join(",".join(r) for r in [["ID", "Age", "Sex"], *rows]))


@budget(100)
@given(data=METADATA.flatmap(mutated_text) | st.binary(max_size=64))
def test_metadata_table(folder, data):
    """meta_data.csv: a table by person ID, or one error."""
    from twostage.data.metadata import load_metadata

    path = folder / "meta_data.csv"
    path.write_bytes(data)
    table = outcome(lambda: load_metadata(folder), path)
    assert isinstance(table, (dict, TwostageError))


# --------------------------------------------------------------------------- exported chain

@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_tiny_checkpoint) -> Path:
    """A `twostage export` folder of tiny random checkpoints (global + palm, bicubic)."""
    pytest.importorskip("onnxruntime")
    from twostage.inference.export import export

    base = tmp_path_factory.mktemp("exported")
    g = make_tiny_checkpoint(base / "g.pt", "global")
    p = make_tiny_checkpoint(base / "p.pt", "palm", classes=PALM_CLASSES, seed=1)
    export(g, base / "ok", palm_ckpt=p)
    return base / "ok"


@budget(30)
@given(data=st.data())
def test_exported_chain_yaml(folder, exported, data):
    """onnx_backend.read_exported + exported_chain on a damaged chain.yaml (a value of a
    section replaced, the text mutated, nasty YAML): a chain, or one error naming the folder."""
    import copy
    import shutil

    from twostage.inference.onnx_backend import exported_chain

    text = (exported / "chain.yaml").read_text()
    spec = yaml.safe_load(text)
    section = data.draw(st.sampled_from(sorted(spec)))
    changed = copy.deepcopy(spec)
    if isinstance(spec[section], dict) and spec[section] and data.draw(st.booleans()):
        changed[section][data.draw(st.sampled_from(sorted(spec[section])))] = data.draw(VALUES)
    else:
        changed[section] = data.draw(VALUES)
    raw = data.draw(st.one_of(st.just(json.dumps(changed, allow_nan=True).encode()), mutated_text(text),
                              st.sampled_from(YAML_NASTY[:12]).map(str.encode)))
    target = folder / "exported"
    if not target.is_dir():
        shutil.copytree(exported, target)
    (target / "chain.yaml").write_bytes(raw)
    outcome(lambda: exported_chain(target), target)
