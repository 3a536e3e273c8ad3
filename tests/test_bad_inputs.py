"""Bad input to every command: a one-line error naming the file and the problem, a non-zero
exit, no traceback (unless --debug), and existing outputs left byte-for-byte unchanged.

Every case runs the real command in a subprocess (`python -m twostage ...`) so the exit code
and stderr are what a user sees. Inputs that are legitimately accepted (16-bit, RGBA, points
outside the image) are asserted to behave as documented instead.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_one_line_error
from conftest import run_cli as twostage

from twostage.classes import CLASSES, PALM_CLASSES


def snapshot(*paths: Path) -> dict:
    """{file: (bytes, mtime_ns)} of every file under the given files/folders."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            out[f] = (f.read_bytes(), f.stat().st_mtime_ns)
    return out


# --- shared tiny world: dataset, checkpoints, a good CSV, good outputs ------------------------

@pytest.fixture(scope="module")
def world(make_world) -> dict:
    from twostage.cli import main

    world = make_world("bad", seed=3)
    csv = world["root"] / "pred.csv"
    assert main(["-q", "infer", str(world["data"]), "--global", str(world["global"]), "--out", str(csv),
                 "--split", "train"]) == 0
    return {**world, "csv": csv}


def json_of(png: Path) -> Path:
    parts = list(png.parts)
    i = len(parts) - 1 - parts[::-1].index("DCM")
    parts[i] = "outputs_json"
    return Path(*parts).with_suffix(".json")


def bad_copy(world, tmp_path: Path, *kinds: str) -> tuple[Path, list[Path]]:
    """A copy of the dataset with image k's files spoiled as kinds[k]; returns (root, spoiled files)."""
    data = tmp_path / "DATA"
    shutil.copytree(world["data"], data)
    return data, [spoil(data, kind, k) for k, kind in enumerate(kinds)]


def spoil(data: Path, kind: str, index: int) -> Path:
    """Spoil the index-th training image or its JSON as `kind`; returns the spoiled file."""
    import cv2

    png = sorted((data / "train" / "DCM").rglob("*.png"))[index]
    js = json_of(png)
    img = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    obj = json.loads(js.read_text())
    if kind == "truncated-png":
        b = png.read_bytes()
        png.write_bytes(b[: len(b) // 2])
        return png
    if kind == "zero-byte-png":
        png.write_bytes(b"")
        return png
    if kind == "not-a-png":
        png.write_bytes(b"GIF89a this is not a png at all" * 10)
        return png
    if kind in ("huge-header", "bit-flip"):  # a 100000x100000 IHDR (CRC right), or a flipped IDAT bit
        import struct
        import zlib

        b = bytearray(png.read_bytes())
        if kind == "huge-header":
            b[16:24] = struct.pack(">II", 100_000, 100_000)
            b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
        else:
            b[45] ^= 0x10
        png.write_bytes(bytes(b))
        return png
    if kind == "16-bit":
        cv2.imwrite(str(png), img.astype(np.uint16) * 257)
        return png
    if kind == "rgba":
        g = img if img.ndim == 2 else img[:, :, 0]
        cv2.imwrite(str(png), np.dstack([g, g, g, np.full_like(g, 255)]))
        return png
    if kind == "wrong-size":
        cv2.imwrite(str(png), cv2.resize(img, (96, 96)))
        return png
    if kind == "invalid-json":
        js.write_text('{"annotations": [ {"label": "Lunate", ')
        return js
    if kind == "empty-json":
        js.write_text("")
        return js
    if kind == "unknown-label":
        obj["annotations"][0]["label"] = "Sesamoid-X"
    elif kind == "nan-points":
        obj["annotations"][0]["points"][0] = [float("nan"), 3]
    elif kind == "string-points":
        obj["annotations"][0]["points"][0] = ["ten", "3"]
    elif kind.startswith("points-"):  # points-0, points-1, points-2
        n = int(kind[-1])
        obj["annotations"][0]["points"] = obj["annotations"][0]["points"][:n]
    elif kind == "outside":
        obj["annotations"][0]["points"][0] = [100000, -5000]
    else:
        raise ValueError(kind)
    js.write_text(json.dumps(obj))  # json.dumps writes NaN as the (non-standard) NaN token
    return js


IMAGE_ERRORS = {"truncated-png": "truncated", "zero-byte-png": "empty", "not-a-png": "not"}
JSON_ERRORS = {"invalid-json": "invalid JSON", "empty-json": "invalid JSON", "nan-points": "NaN",
               "string-points": "non-numeric"}


# --- check: reports every problem; exit 1 only for unusable data ----------------------------

@pytest.mark.parametrize("kind", [*IMAGE_ERRORS, *JSON_ERRORS])
def test_check_unusable(world, tmp_path, kind):
    """Corrupt PNGs and unparsable JSON (NaN / string points included) make the data unusable: exit 1."""
    data, (bad,) = bad_copy(world, tmp_path, kind)
    res = twostage("check", data)
    assert "Traceback" not in res.stderr + res.stdout
    assert res.returncode == 1, res.stdout + res.stderr
    assert bad.stem in res.stdout + res.stderr  # check names the broken file (image or JSON)


def test_check_accepts_with_warnings(world, tmp_path):
    """16-bit, RGBA, odd sizes, unknown labels, short polygons, points outside: exit 0, each counted."""
    data, bad = bad_copy(world, tmp_path, "16-bit", "rgba", "wrong-size")
    bad += [spoil(data, kind, k) for k, kind in enumerate(["unknown-label", "points-1", "outside", "points-0"])]
    res = twostage("check", data)
    report = res.stdout + res.stderr
    assert res.returncode == 0 and "Traceback" not in report, report
    for f in bad:
        assert f.stem in report, report
    for word in ("unknown", "outside", "point(s)", "96x96"):
        assert word in report, (word, report)


def test_check_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    res = twostage("check", tmp_path / "empty")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "empty" in res.stdout + res.stderr


# --- data commands: prepare-sr, train, score's GT, visualize: bad dataset files --------------

@pytest.mark.parametrize("kind", [*IMAGE_ERRORS, *JSON_ERRORS])
def test_prepare_sr_bad_data(world, tmp_path, kind):
    data, (bad,) = bad_copy(world, tmp_path, kind)
    out = tmp_path / "PALM"
    res = twostage("prepare-sr", data, "--out", out, "--scale", "2")
    assert_one_line_error(res, bad.name)
    # finished items are atomic and valid; nothing half-written, no palm-set record claiming completion
    assert not any(p.name.endswith(".tmp") or ".tmp." in p.name for p in out.rglob("*")) if out.exists() else True


def test_prepare_sr_accepts_with_warning(world, tmp_path):
    data, _ = bad_copy(world, tmp_path, "16-bit", "rgba", "unknown-label", "points-1")
    spoil(data, "outside", 0)
    res = twostage("prepare-sr", data, "--out", tmp_path / "PALM", "--scale", "2")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "PALM" / "palmset.json").is_file()


@pytest.mark.parametrize("kind", ["zero-byte-png", "invalid-json", "string-points"])
def test_score_bad_ground_truth(world, tmp_path, kind):
    data, (bad,) = bad_copy(world, tmp_path, kind)
    res = twostage("score", world["csv"], "--gt", data)
    assert_one_line_error(res, bad.name)


@pytest.mark.parametrize("kind", ["truncated-png", "invalid-json"])
def test_train_bad_data(world, tmp_path, kind):
    data, (bad,) = bad_copy(world, tmp_path, kind)
    out = tmp_path / "run"
    res = twostage("train", "--stage", "global", "--data", data, "--out", out, "--epochs", "1",
                   "--input-size", "64", "--workers", "0", "--set", "model.encoder_weights=none",
                   "--set", "data.preload=true", "--set", "model.arch=Unet", "--set", "model.encoder=resnet18")
    assert_one_line_error(res, bad.name)
    assert not (out / "last.pt").exists()


# --- infer: bad images, checkpoints, options; the existing CSV is never touched -------------

@pytest.fixture
def existing_csv(tmp_path) -> Path:
    out = tmp_path / "out.csv"
    out.write_text("image_name,class,rle\nkeep-me,finger-1,1 2\n")
    return out


@pytest.mark.parametrize("kind", list(IMAGE_ERRORS))
def test_infer_bad_image(world, tmp_path, existing_csv, kind):
    data, (bad,) = bad_copy(world, tmp_path, kind)
    before = snapshot(existing_csv)
    res = twostage("infer", data, "--split", "train", "--global", world["global"], "--out", existing_csv)
    assert_one_line_error(res, bad.name)
    assert snapshot(existing_csv) == before


def test_oversized_and_damaged_png(world, tmp_path, capfd):
    """A PNG header declaring an image beyond OpenCV's limit used to stop `check` and
    `infer --skip-bad` with an OpenCV traceback, and a flipped bit left libpng's own
    `libpng error:` line beside ours. Now: listed by check, skipped by --skip-bad, one line
    without it; libpng's messages only inside our error."""
    from twostage.cli import main

    data, (huge, flipped) = bad_copy(world, tmp_path, "huge-header", "bit-flip")
    assert main(["check", str(data)]) == 1
    out = capfd.readouterr()
    assert "100000x100000 image (10000000000 pixels), over the limit" in out.out and "corrupt or truncated PNG: IDAT" in out.out
    assert "libpng" not in out.err and "Traceback" not in out.err
    csv = tmp_path / "out.csv"
    args = ["infer", str(data), "--split", "train", "--global", str(world["global"]), "--out", str(csv)]
    assert main([*args, "--skip-bad"]) == 0
    out = capfd.readouterr()
    assert f"  {huge}" in out.out and f"  {flipped}" in out.out and "libpng" not in out.err
    assert len(csv.read_text().splitlines()) == 1 + 4 * len(CLASSES)
    csv.unlink()
    assert main(args) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {huge}: the PNG header declares") and not csv.exists()


def test_infer_accepts_rgba_and_any_size(world, tmp_path):
    data, bad = bad_copy(world, tmp_path, "rgba", "wrong-size")
    out = tmp_path / "out.csv"
    res = twostage("infer", data, "--split", "train", "--global", world["global"], "--out", out)
    assert res.returncode == 0, res.stderr
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 4 * len(CLASSES)
    assert all(any(r.startswith(f.name + ",") for r in rows) for f in bad)


def test_infer_16bit_matches_8bit(world, tmp_path):
    """A 16-bit copy of an 8-bit image (x257) gives the same CSV: bit depth comes from the dtype."""
    data, _ = bad_copy(world, tmp_path, "16-bit")
    out = tmp_path / "out.csv"
    assert twostage("infer", data, "--split", "train", "--global", world["global"], "--out", out).returncode == 0
    assert out.read_bytes() == world["csv"].read_bytes()


def _bad_checkpoints(world, tmp) -> dict:
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    empty = tmp / "empty.pt"
    empty.write_bytes(b"")
    import torch

    foreign = tmp / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    return {"garbage": garbage, "empty": empty, "foreign": foreign, "missing": tmp / "nope.pt"}


@pytest.mark.parametrize("which", ["garbage", "empty", "foreign", "missing", "palm-as-global"])
def test_infer_bad_global_checkpoint(world, tmp_path, existing_csv, which):
    ckpts = _bad_checkpoints(world, tmp_path)
    ck = world["palm"] if which == "palm-as-global" else ckpts[which]
    before = snapshot(existing_csv)
    res = twostage("infer", world["data"], "--split", "train", "--global", ck, "--out", existing_csv)
    assert_one_line_error(res, ck.name)
    assert snapshot(existing_csv) == before


def test_infer_checkpoint_with_wrong_classes(world, tmp_path, existing_csv, make_tiny_checkpoint):
    """A 'global' checkpoint predicting only the carpals, or a palm model with finger classes."""
    g8 = make_tiny_checkpoint(tmp_path / "g8.pt", "global", classes=PALM_CLASSES)
    before = snapshot(existing_csv)
    res = twostage("infer", world["data"], "--split", "train", "--global", g8, "--out", existing_csv)
    assert_one_line_error(res, "g8.pt", "classes")
    p_bad = make_tiny_checkpoint(tmp_path / "pbad.pt", "palm", classes=["Lunate", "not-a-bone"])
    res = twostage("infer", world["data"], "--split", "train", "--global", world["global"], "--palm", p_bad,
                   "--fuse", "--out", existing_csv)
    assert_one_line_error(res, "pbad.pt")
    assert snapshot(existing_csv) == before


def test_infer_global_as_palm(world, tmp_path, existing_csv):
    before = snapshot(existing_csv)
    res = twostage("infer", world["data"], "--split", "train", "--global", world["global"], "--palm",
                   world["global"], "--fuse", "--out", existing_csv)
    assert_one_line_error(res, "global.pt", "palm")
    assert snapshot(existing_csv) == before


@pytest.mark.parametrize("args, fragment", [
    (["--thresholds", "1.5"], "1.5"),
    (["--thresholds", "{file}"], "th.yaml"),
    (["--batch-size", "0"], "batch"),
    (["--shard", "3/2"], "shard"),
    (["--fp16"], "fp16"),
])
def test_infer_bad_options(world, tmp_path, existing_csv, args, fragment):
    th = tmp_path / "th.yaml"
    th.write_text("Lunate: 0.4\nnot-a-bone: 0.3\n")
    args = [a.replace("{file}", str(th)) for a in args]
    before = snapshot(existing_csv)
    res = twostage("infer", world["data"], "--split", "train", "--global", world["global"], "--out",
                   existing_csv, *args)
    assert_one_line_error(res, fragment)
    assert snapshot(existing_csv) == before


def test_infer_empty_folder(world, tmp_path, existing_csv):
    (tmp_path / "empty").mkdir()
    before = snapshot(existing_csv)
    res = twostage("infer", tmp_path / "empty", "--global", world["global"], "--out", existing_csv)
    assert_one_line_error(res, "empty")
    assert snapshot(existing_csv) == before


def test_debug_shows_traceback(world, tmp_path):
    res = twostage("--debug", "infer", tmp_path / "nothing", "--global", world["global"], "--out", tmp_path / "o.csv")
    assert res.returncode != 0 and "Traceback" in res.stderr and "TwostageError" in res.stderr


# --- score / ensemble / visualize: bad prediction CSVs ----------------------------------------

def spoil_csv(good: Path, out: Path, kind: str) -> Path:
    lines = good.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    # the first row with a non-empty RLE
    k = next(i for i, r in enumerate(rows) if r.split(",")[2])
    name, cls, rle = rows[k].split(",")
    if kind == "missing-rows":
        rows = rows[:-3]
    elif kind == "extra-rows":
        rows = rows + [f"{name},{cls},1 1"]
    elif kind == "unknown-class":
        rows[k] = f"{name},Sesamoid,{rle}"
    elif kind == "odd-rle":
        rows[k] = f"{name},{cls},{rle} 7"
    elif kind == "out-of-range-rle":
        rows[k] = f"{name},{cls},{128 * 128 - 2} 10"
    elif kind == "overlap-rle":
        rows[k] = f"{name},{cls},10 5 12 3"
    elif kind == "non-numeric-rle":
        rows[k] = f"{name},{cls},10 five"
    elif kind == "bad-header":
        header = "image,class,mask"
    elif kind == "empty":
        header, rows = None, []
    elif kind == "wrong-fields":
        rows[k] = f"{name},{cls}"
    else:
        raise ValueError(kind)
    out.write_text("" if header is None else "\n".join([header, *rows]) + "\n")
    return out


CSV_KINDS = ["missing-rows", "extra-rows", "unknown-class", "odd-rle", "out-of-range-rle", "overlap-rle",
             "non-numeric-rle", "bad-header", "empty", "wrong-fields"]


@pytest.mark.parametrize("kind", CSV_KINDS)
def test_score_bad_csv(world, tmp_path, kind):
    bad = spoil_csv(world["csv"], tmp_path / f"{kind}.csv", kind)
    report = tmp_path / "report.json"
    report.write_text("{}\n")
    before = snapshot(report)
    res = twostage("score", bad, "--gt", world["data"], "--json", report)
    assert_one_line_error(res, bad.name)
    assert snapshot(report) == before


@pytest.mark.parametrize("kind", ["odd-rle", "missing-rows", "bad-header", "overlap-rle"])
def test_ensemble_bad_csv(world, tmp_path, existing_csv, kind):
    bad = spoil_csv(world["csv"], tmp_path / f"{kind}.csv", kind)
    before = snapshot(existing_csv)
    res = twostage("ensemble", "--csv", world["csv"], bad, world["csv"], "--out", existing_csv)
    assert_one_line_error(res, bad.name)
    assert snapshot(existing_csv) == before


def test_ensemble_bad_probs(world, tmp_path, existing_csv):
    probs = tmp_path / "probs"
    probs.mkdir()
    (probs / "x.png.npz").write_bytes(b"garbage")
    before = snapshot(existing_csv)
    res = twostage("ensemble", "--probs", probs, probs, "--out", existing_csv)
    assert_one_line_error(res, "x.png.npz")
    assert snapshot(existing_csv) == before


@pytest.mark.parametrize("kind", ["odd-rle", "non-numeric-rle"])
def test_visualize_bad_csv(world, tmp_path, kind):
    bad = spoil_csv(world["csv"], tmp_path / f"{kind}.csv", kind)
    out = tmp_path / "pics"
    res = twostage("visualize", world["data"], "--csv", bad, "--out", out)
    assert_one_line_error(res, bad.name)
    assert not out.exists() or not any(out.rglob("*.png"))


# --- checkpoint-consuming commands: wrong stage ------------------------------------------------

@pytest.mark.parametrize("command", ["evaluate", "calibrate", "visualize"])
def test_wrong_stage_checkpoint(world, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "keep.txt"
    keep.write_text("existing\n")
    before = snapshot(out)
    args = [command, world["data"], "--global", world["palm"], "--out", out]
    if command != "visualize":
        args += ["--palm", world["palm"]]
    res = twostage(*args)
    assert_one_line_error(res, "palm.pt", "global")
    assert snapshot(out) == before


def test_calibrate_bad_grid(world, tmp_path):
    res = twostage("calibrate", world["data"], "--global", world["global"], "--palm", world["palm"],
                   "--out", tmp_path / "cal", "--grid", "0,x,1")
    assert_one_line_error(res, "grid")
    assert not (tmp_path / "cal" / "thresholds.yaml").exists()


@pytest.mark.parametrize("command", ["evaluate", "calibrate", "visualize"])
def test_empty_data_folder(world, tmp_path, command):
    (tmp_path / "empty").mkdir()
    args = [command, tmp_path / "empty", "--global", world["global"], "--out", tmp_path / "out"]
    if command != "visualize":
        args += ["--palm", world["palm"]]
    res = twostage(*args)
    assert_one_line_error(res, "empty")


# --- train: configs, resume, palm set ---------------------------------------------------------

@pytest.mark.parametrize("content, fragment", [
    ("train:\n  epochz: 3\n", "epochz"),  # unknown key, with a suggestion
    ("train:\n  epochs: three\n", "epochs"),  # wrong type
    ("bogus_section: 1\n", "bogus_section"),
    ("train: [1, 2\n", "yaml"),  # invalid YAML
    ("- a\n- b\n", "mapping"),
])
def test_train_bad_config(world, tmp_path, content, fragment):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stage: global\n" + content if not content.startswith("-") else content)
    res = twostage("train", "--config", cfg, "--data", world["data"], "--out", tmp_path / "run")
    assert_one_line_error(res, fragment)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("override, fragment", [
    ("model.encodr=resnet18", "model.encodr"),
    ("train.batch_size=big", "batch_size"),
    ("nonsense", "nonsense"),
])
def test_train_bad_override(world, tmp_path, override, fragment):
    res = twostage("train", "--stage", "global", "--set", override, "--data", world["data"], "--out", tmp_path / "run")
    assert_one_line_error(res, fragment)


def test_train_resume_without_checkpoint(world, tmp_path):
    res = twostage("train", "--stage", "global", "--data", world["data"], "--out", tmp_path / "run", "--resume")
    assert_one_line_error(res, "resume")


def test_train_resume_wrong_stage_checkpoint(world, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(world["palm"], run / "last.pt")
    from twostage.config import load_config

    load_config("global", data=str(world["data"]), out=str(run)).save(run / "config.yaml")
    before = snapshot(run)
    res = twostage("train", "--stage", "global", "--data", world["data"], "--out", run, "--resume")
    assert_one_line_error(res, "last.pt")
    assert snapshot(run) == before


def test_train_palm_on_a_plain_dataset(world, tmp_path):
    res = twostage("train", "--stage", "palm", "--data", world["data"], "--out", tmp_path / "run")
    assert_one_line_error(res, "palmset.json")


def test_train_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    res = twostage("train", "--stage", "global", "--data", tmp_path / "empty", "--out", tmp_path / "run")
    assert_one_line_error(res, "empty")


# --- weights: wrong hash, bad manifest --------------------------------------------------------

def test_weights_wrong_hash(tmp_path, make_sr_weights, world):
    (tmp_path / "w").mkdir()
    manifest = make_sr_weights(tmp_path / "w")
    obj = yaml.safe_load(manifest.read_text())
    obj["weights"]["vgg-x4"]["sha256"] = "0" * 64
    manifest.write_text(yaml.safe_dump(obj))
    res = twostage("weights", "--weights-dir", tmp_path / "w")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "bad" in res.stdout + res.stderr
    out = tmp_path / "PALM"
    res = twostage("prepare-sr", world["data"], "--out", out, "--upscaler", "vgg-x4", "--weights-dir", tmp_path / "w")
    assert_one_line_error(res, "vgg-x4.pth", "sha256")
    assert not out.exists() or not any(out.rglob("*.png"))


@pytest.mark.parametrize("content, fragment", [
    ("weights: [1, 2]\n", "weights"),
    ("weights:\n  x: {file: a.pth, arch: Nope, scale: 4, url: u}\n", "Nope"),
    ("weights: {x: {file: a.pth}}\n", "missing"),
    (": : :\n", "yaml"),
])
def test_weights_bad_manifest(tmp_path, content, fragment):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "manifest.yaml").write_text(content)
    res = twostage("weights", "--weights-dir", tmp_path / "w")
    assert_one_line_error(res, "manifest.yaml", fragment)


def test_weights_unknown_name(tmp_path, make_sr_weights):
    make_sr_weights(tmp_path)
    res = twostage("weights", "--weights-dir", tmp_path, "--pin", "nope")
    assert_one_line_error(res, "nope")


# --- synth and demo: bad arguments ------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--size", "10"], "size"),
    (["--n", "-1"], "n"),
    (["--n", "abc"], "abc"),
])
def test_synth_bad_args(tmp_path, args, fragment):
    res = twostage("synth", "--out", tmp_path / "S", *args)
    assert_one_line_error(res, fragment)
    assert not (tmp_path / "S").exists() or not any((tmp_path / "S").rglob("*.png"))


def test_synth_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "S"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    before = snapshot(out)
    res = twostage("synth", "--out", out, "--n", "2", "--size", "64")
    assert_one_line_error(res, str(out.name))
    assert snapshot(out) == before


@pytest.mark.parametrize("args, fragment", [
    (["--size", "abc"], "abc"),
    (["--size", "8"], "size"),
    (["--device", "tpu"], "tpu"),
])
def test_demo_bad_args(tmp_path, args, fragment):
    res = twostage("demo", "--out", tmp_path / "demo", *args)
    assert_one_line_error(res, fragment)
