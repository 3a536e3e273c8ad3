"""Untrusted files: checkpoints and weights that would run code on load are refused (every
torch.load uses weights_only=True), and paths written inside annotation JSON are never used
to open or write files."""
from __future__ import annotations

import builtins
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_one_line_error
from conftest import run_cli as twostage

PACKAGE = Path(__file__).resolve().parents[1] / "twostage"


class Evil:
    """Unpickling this calls open(marker, "w"): the marker file proves code ran on load."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def evil_file(path: Path, marker: Path, weights: bool = False) -> Path:
    """A file shaped like our checkpoint (or like a Real-ESRGAN .pth) with a payload inside."""
    if weights:
        obj = {"params_ema": {"payload": Evil(marker)}}
    else:
        obj = {"format": "twostage-ckpt-1", "state_dict": {}, "meta": {"stage": "global", "payload": Evil(marker)}}
    torch.save(obj, path)
    return path


def assert_refused(res: subprocess.CompletedProcess, name: str, marker: Path) -> None:
    assert assert_one_line_error(res, name).startswith("error:")
    assert not marker.exists(), "the payload ran"


@pytest.fixture(scope="module")
def world(make_world) -> dict:
    return make_world("untrusted", seed=1)


def test_payload_is_real(tmp_path):
    """Control: without weights_only the crafted file does run code, so the tests below can fail."""
    marker = tmp_path / "ran"
    torch.load(evil_file(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_infer_refuses_crafted_global(world, tmp_path):
    marker = tmp_path / "ran"
    ck = evil_file(tmp_path / "evil.pt", marker)
    res = twostage("infer", world["data"], "--split", "train", "--global", ck, "--out", tmp_path / "o.csv")
    assert_refused(res, "evil.pt", marker)
    assert not (tmp_path / "o.csv").exists()


def test_infer_refuses_crafted_palm(world, tmp_path):
    marker = tmp_path / "ran"
    ck = evil_file(tmp_path / "evil.pt", marker)
    res = twostage("infer", world["data"], "--split", "train", "--global", world["global"], "--palm", ck, "--fuse",
                   "--out", tmp_path / "o.csv")
    assert_refused(res, "evil.pt", marker)
    assert not (tmp_path / "o.csv").exists()


def test_train_resume_refuses_crafted_last(world, tmp_path):
    from twostage.config import load_config

    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    load_config("global", data=str(world["data"]), out=str(run)).save(run / "config.yaml")
    evil_file(run / "last.pt", marker)
    res = twostage("train", "--stage", "global", "--data", world["data"], "--out", run, "--resume")
    assert_refused(res, "last.pt", marker)


def test_weights_loader_refuses_crafted_pth_with_matching_hash(world, tmp_path, make_sr_weights):
    """The manifest pins the crafted file's own hash, so only weights_only stands in the way."""
    from twostage.errors import TwostageError
    from twostage.io.files import sha256_file
    from twostage.sr.weights import load_model

    wdir = tmp_path / "w"
    wdir.mkdir()
    manifest = make_sr_weights(wdir)
    marker = tmp_path / "ran"
    evil = evil_file(wdir / "evil.pth", marker, weights=True)
    obj = yaml.safe_load(manifest.read_text())
    obj["weights"]["evil"] = {**obj["weights"]["vgg-x4"], "file": "evil.pth", "sha256": sha256_file(evil)}
    manifest.write_text(yaml.safe_dump(obj))
    with pytest.raises(TwostageError, match="evil.pth"):
        load_model("evil", wdir)
    assert not marker.exists()
    res = twostage("prepare-sr", world["data"], "--out", tmp_path / "PALM", "--upscaler", "evil",
                   "--weights-dir", wdir)
    assert_refused(res, "evil.pth", marker)


def test_every_torch_load_is_weights_only():
    """grep: each torch.load call in the package passes weights_only=True."""
    calls = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 1, m.end()
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls.append((f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}", text[m.start():end]))
    assert calls, "no torch.load found: the scan is broken"
    bad = [where for where, call in calls if "weights_only=True" not in call]
    assert not bad, f"torch.load without weights_only=True at {bad}"
    # no other unpickler either
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"pickle\.loads?\(|allow_pickle=True|weights_only=False", text), path


# --- paths inside JSON are data, never file names ---------------------------------------------

@pytest.fixture
def hostile_data(world, tmp_path) -> Path:
    """The dataset with every JSON `filename` pointing outside (relative and absolute)."""
    data = tmp_path / "sandbox" / "DATA"
    shutil.copytree(world["data"], data)
    for k, js in enumerate(sorted((data / "train" / "outputs_json").rglob("*.json"))):
        obj = json.loads(js.read_text())
        obj["filename"] = "../../../evil.png" if k % 2 == 0 else str(tmp_path / "abs-evil.png")
        obj.setdefault("metadata", {})["filename"] = "../../evil.json"
        js.write_text(json.dumps(obj))
    return data


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_json_paths_are_never_opened_or_written(world, hostile_data, tmp_path):
    sandbox = tmp_path
    before = files_under(sandbox)
    palm = sandbox / "out" / "PALM"
    run = sandbox / "out" / "run"
    assert twostage("check", hostile_data, "--json", sandbox / "out" / "check.json").returncode == 0
    res = twostage("prepare-sr", hostile_data, "--out", palm, "--scale", "2")
    assert res.returncode == 0, res.stderr
    res = twostage("train", "--stage", "global", "--data", hostile_data, "--out", run, "--epochs", "1",
                   "--batch-size", "2", "--input-size", "64", "--workers", "0", "--device", "cpu",
                   "--set", "model.arch=Unet", "--set", "model.encoder=resnet18", "--set", "model.encoder_weights=none",
                   "--set", "model.kwargs={encoder_depth: 3, decoder_channels: [16, 8, 8]}",
                   "--set", "data.folds=2", "--set", "data.preload=true")
    assert res.returncode == 0, res.stderr
    new = files_under(sandbox) - before
    outside = sorted(p for p in new if sandbox / "out" not in p.parents)
    assert not outside, f"files written outside the outputs: {outside}"
    assert not list(sandbox.parent.glob("*evil*")) and not list(sandbox.glob("*evil*"))
    # the crops' JSONs are named after their own images, not after the hostile `filename`
    for js in (palm / "train" / "outputs_json").rglob("*.json"):
        assert "evil" not in json.loads(js.read_text()).get("filename", ""), js
