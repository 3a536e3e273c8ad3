"""`twostage prepare-sr` on phantom data: geometry, record, resume, shards, setting changes."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import reference as R
from conftest import twostage_cmd

from twostage import box as B
from twostage.classes import CLASS_TO_INDEX, PALM_CLASSES, PALM_INDICES
from twostage.cli import main as cli_main
from twostage.data.annotations import rasterize, read_annotations, write_annotations
from twostage.data.layout import find_samples
from twostage.data.palm_set import load_palm_set
from twostage.data.synth import synthesize
from twostage.errors import TwostageError
from twostage.io.images import read_image
from twostage.metrics import dice_per_class
from twostage.sr.prepare import prepare_sr
from twostage.sr.upscale import make_upscaler

SCALE = 4
SIZE = 512  # carpals of a few hundred source pixels: one pixel moves Dice < 0.5 %


@pytest.fixture(scope="module")
def data(make_phantoms) -> Path:
    return make_phantoms("synth", n=6, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def palm(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("palm") / "PALM"
    counts = prepare_sr(data, out, upscaler="bicubic", scale=SCALE)
    assert counts == {"done": 6, "skipped": 0, "no_carpals": 0, "dropped": 0}
    return out


def files(root: Path) -> dict[str, bytes]:
    """Every visible file under root (temp files of a killed run start with '.')."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_polygons_match_source_masks(data, palm):
    up = make_upscaler("bicubic", scale=SCALE)
    palm_samples = {s.rel: s for s in find_samples(palm)}
    assert set(palm_samples) == {s.rel for s in find_samples(data)}
    for s in find_samples(data):
        man = json.loads((palm / "manifest" / Path(s.rel).with_suffix(".json")).read_text())
        ctx, box = B.Box.from_dict(man["context_box"]), B.Box.from_dict(man["box"])
        assert ctx.side == round(box.side * 1.5) or ctx.side == SIZE
        assert box.x0 >= ctx.x0 and box.x1 <= ctx.x1 and box.y0 >= ctx.y0 and box.y1 <= ctx.y1
        src_anns = read_annotations(s.json_path)
        src = rasterize(src_anns, (SIZE, SIZE))
        p = palm_samples[s.rel]
        crop_img = read_image(p.image_path)
        np.testing.assert_array_equal(crop_img, up(np.ascontiguousarray(B.crop_image(read_image(s.image_path), ctx))))
        got = rasterize(read_annotations(p.json_path), crop_img.shape)
        # crop space: against the source masks cropped and upscaled (bilinear, threshold 0.5)
        ref = (R.source_to_crop(src.astype(np.float32), ctx, SCALE) >= 0.5).astype(np.uint8)
        d = dice_per_class(got, ref)[list(PALM_INDICES)]
        assert d.min() >= 0.98, d
        # mapped back to source pixels (what scoring sees): the source masks
        back = (R.crop_to_source(got.astype(np.float32), ctx, SCALE) >= 0.5).astype(np.uint8)
        d = dice_per_class(back, B.crop_image(src, ctx))[list(PALM_INDICES)]
        assert d.min() >= 0.98, d
        # every class that reaches into the crop is there, others are dropped
        labels = {a.label for a in read_annotations(p.json_path)}
        for c, i in CLASS_TO_INDEX.items():
            if B.crop_image(src[i], ctx).sum() >= 4:
                assert c in labels, (s.rel, c)
            if src[i].sum() and not B.crop_image(src[i], ctx).any():
                assert c not in labels, (s.rel, c)


def test_palm_set_record(data, palm):
    rec = load_palm_set(palm)
    assert (rec["upscaler"], rec["scale"], rec["weight_sha256"], rec["context"]) == ("bicubic", 4, None, 1.5)
    rule = B.BoxRule.from_dict(rec["box_rule"])
    assert rule.margin == B.DEFAULT_MARGIN and rule.fallback is not None and 0 < rule.side_min <= rule.side_max
    boxes = [B.Box.from_dict(json.loads(p.read_text())["box"]) for p in sorted((palm / "manifest").rglob("*.json"))]
    assert rule.side_min == pytest.approx(min(b.side for b in boxes) / SIZE)
    with pytest.raises(TwostageError, match="not a prepare-sr output"):
        load_palm_set(data)


def test_check_passes_on_output(palm):
    check = pytest.importorskip("twostage.data.check")
    report = check.check_dataset(palm)
    assert report.ok, report.text()


def test_resume_after_simulated_kill_is_identical(data, palm, tmp_path):
    """The state a kill can leave (atomic writes): finished items, items with some outputs but
    no manifest, stray temp files. A re-run finishes it byte-identically."""
    out = tmp_path / "PALM"
    shutil.copytree(palm, out)
    mans = sorted((out / "manifest").rglob("*.json"))
    for m in mans[:3]:
        m.unlink()
    rel = mans[0].relative_to(out / "manifest").with_suffix(".png")
    (out / "train" / "DCM" / rel).write_bytes(b"\x89PNG stale from an older run")
    (out / "train" / "DCM" / rel.parent / f".{rel.name}.abc.tmp.png").write_bytes(b"partial")
    counts = prepare_sr(data, out, upscaler="bicubic", scale=SCALE)
    assert counts["done"] == 3 and counts["skipped"] == 3
    assert files(out) == files(palm)


def test_resume_after_sigkill_is_identical(data, palm, tmp_path):
    out = tmp_path / "PALM"
    cmd = twostage_cmd("prepare-sr", data, "--out", out, "--scale", SCALE)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not list((out / "manifest").rglob("*.json")):
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((out / "manifest").rglob("*.json"))) < 6, "the run finished before the kill"
    assert cli_main(["prepare-sr", str(data), "--out", str(out), "--scale", str(SCALE)]) == 0
    assert files(out) == files(palm)


def test_shards_give_the_same_output(data, palm, tmp_path):
    out = tmp_path / "PALM"
    a = prepare_sr(data, out, scale=SCALE, shard=(0, 2))
    # one shard meaning for every command: shard 0/2 is the first contiguous half of the sorted items
    first = sorted(p.relative_to(out / "manifest").as_posix() for p in (out / "manifest").rglob("*.json"))
    every = sorted(Path(s.rel).with_suffix(".json").as_posix() for s in find_samples(data, "train"))
    assert first == every[:3]
    b = prepare_sr(data, out, scale=SCALE, shard="1/2")
    assert a["done"] == 3 and b["done"] == 3
    assert files(out) == files(palm)
    with pytest.raises(TwostageError, match="0-based"):
        prepare_sr(data, out, scale=SCALE, shard=(2, 2))


def test_other_settings_into_same_folder_error(data, palm, tmp_path, capsys, make_sr_weights):
    out = tmp_path / "PALM"
    shutil.copytree(palm, out)
    assert cli_main(["prepare-sr", str(data), "--out", str(out), "--scale", "2"]) == 2
    assert "scale: 4 -> 2" in capsys.readouterr().err
    with pytest.raises(TwostageError, match="margin"):
        prepare_sr(data, out, scale=SCALE, margin=0.3)
    with pytest.raises(TwostageError, match="unknown"):
        prepare_sr(data, out, upscaler="nope", scale=SCALE)
    # a different upscaler (a network: tiny random-init weights) into the same folder
    wdir = tmp_path / "w"
    wdir.mkdir()
    make_sr_weights(wdir)
    with pytest.raises(TwostageError, match="upscaler: 'bicubic' -> 'vgg-x4'"):
        prepare_sr(data, out, upscaler="vgg-x4", weights_dir=wdir)
    counts = prepare_sr(data, out, upscaler="vgg-x4", weights_dir=wdir, overwrite=True)
    assert counts["done"] == 6
    rec = load_palm_set(out)
    assert rec["upscaler"] == "vgg-x4" and rec["weight_sha256"]
    s = find_samples(out)[0]
    assert read_image(s.image_path).shape == tuple(json.loads(
        (out / "manifest" / Path(s.rel).with_suffix(".json")).read_text())["crop_shape"])


def test_image_without_carpals_is_skipped_with_warning(data, tmp_path, caplog):
    root = tmp_path / "DATA"
    shutil.copytree(data, root)
    s = find_samples(root)[0]
    anns = [a for a in read_annotations(s.json_path) if a.label not in PALM_CLASSES]
    write_annotations(s.json_path, anns, s.name, (SIZE, SIZE))
    with caplog.at_level(logging.WARNING):
        counts = prepare_sr(root, tmp_path / "PALM", scale=2)
    assert counts["no_carpals"] == 1 and counts["done"] == 5
    assert s.rel in caplog.text
    assert not (tmp_path / "PALM" / "train" / "DCM" / s.rel).exists()
    assert load_palm_set(tmp_path / "PALM")["count"] == 5


def test_fixes_drop_image_and_relabel(data, tmp_path):
    first, second = find_samples(data)[:2]
    fixes = tmp_path / "fixes.yaml"
    fixes.write_text(f"{first.rel}:\n  drop_image: true\n{second.rel}:\n  relabel:\n"
                     f"    - {{from: Lunate, to: Pisiform}}\n")
    out = tmp_path / "PALM"
    counts = prepare_sr(data, out, scale=2, fixes=fixes)
    assert counts["dropped"] == 1 and counts["done"] == 5
    assert not (out / "train" / "DCM" / first.rel).exists()
    labels = [a.label for a in read_annotations((out / "train" / "outputs_json" / second.rel).with_suffix(".json"))]
    assert "Lunate" not in labels and labels.count("Pisiform") == 2
    # without the fixes the annotations differ: the item is redone, not skipped
    again = prepare_sr(data, out, scale=2)
    assert again["done"] == 2 and again["skipped"] == 4


def test_small_palm_input_is_warned_by_prepare_sr_and_palm_training(data, palm, tmp_path, caplog):
    """Boxes of ~130 source px here: a 64 px palm input would shrink the x4 crops below native."""
    with caplog.at_level(logging.WARNING):
        prepare_sr(data, tmp_path / "P", upscaler="bicubic", scale=SCALE, palm_input=64)
    assert "palm input 64 px is smaller than the native palm box side" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_sr(data, tmp_path / "P", upscaler="bicubic", scale=SCALE, palm_input=512)
    assert "palm input" not in caplog.text

    from twostage.config import load_config
    from twostage.train.sources import palm_setup, samples_with_masks

    cfg = load_config("palm", data=str(palm), input_size=64)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        palm_setup(cfg, palm, samples_with_masks(palm, None))
    assert "palm training: palm input 64 px" in caplog.text


def test_prepare_sr_cli_checks_the_palm_stage_input_size(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert cli_main(["prepare-sr", str(data), "--out", str(tmp_path / "P")]) == 0  # palm.yaml: 1024
    assert "palm input" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert cli_main(["prepare-sr", str(data), "--out", str(tmp_path / "P"), "--input-size", "64"]) == 0
    assert "palm input 64 px" in caplog.text


def test_palm_folds_follow_the_global_folds_when_an_image_has_no_carpals(tmp_path):
    """An image without carpal annotations has no palm crop; the palm run must still hold out
    the IDs the global run holds out (folds drawn over the palm set's `split_ids`)."""
    from twostage.config import load_config
    from twostage.train.distributed import Dist
    from twostage.train.sources import fold_indices, samples_with_masks

    root = synthesize(tmp_path / "D", n=12, size=128, seed=3)
    lone = find_samples(root, "train")[0]
    anns = [a for a in read_annotations(lone.json_path) if a.label not in PALM_CLASSES]
    write_annotations(lone.json_path, anns, lone.image_path.name, read_image(lone.image_path).shape)
    prepare_sr(root, tmp_path / "P", scale=2)
    record = load_palm_set(tmp_path / "P")
    assert record["split_ids"] == [s.id for s in find_samples(root, "train")]  # the lone image's ID too

    def held_out(stage: str, data: Path, run: Path) -> set[str]:
        cfg = load_config(stage, data=str(data), overrides=["data.folds=3", "data.fold=1"])
        samples = samples_with_masks(data, None)
        split_ids = load_palm_set(data)["split_ids"] if stage == "palm" else None
        _, va = fold_indices(cfg, run, samples, Dist(), split_ids)
        return {samples[i].id for i in va}

    g, p = held_out("global", root, tmp_path / "rg"), held_out("palm", tmp_path / "P", tmp_path / "rp")
    assert p and p <= g and g - p <= {lone.id}
    assert json.loads((tmp_path / "rg" / "split.json").read_text())["folds"] == \
        json.loads((tmp_path / "rp" / "split.json").read_text())["folds"]
