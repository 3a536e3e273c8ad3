"""Killed runs: prepare-sr, train and infer killed with SIGKILL at seeded random points and run
again (train with --resume) give the same final outputs as an uninterrupted run, and no
half-written file is ever visible under a final name (only dot-prefixed `.*.tmp*` files)."""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLI_ENV, twostage_cmd

from twostage.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TEMP = re.compile(r"^\..+\.(tmp.*|lock(\..+)?)$")  # temporary files; lock files of killed runs
TINY = ["--set", "model.arch=Unet", "--set", "model.encoder=resnet18", "--set", "model.encoder_weights=none",
        "--set", "model.kwargs={encoder_depth: 3, decoder_channels: [16, 8, 8]}",
        "--set", "data.folds=4", "--set", "data.preload=true",
        "--batch-size", "2", "--input-size", "64", "--workers", "0", "--device", "cpu", "--seed", "3"]


def command(*args) -> list[str]:
    return twostage_cmd("-q", *args)


def run_ok(*args) -> None:
    res = subprocess.run(command(*args), capture_output=True, text=True, env=CLI_ENV, timeout=600)
    assert res.returncode == 0, res.stderr


def kill_when(args, ready, rng: random.Random, max_extra: float, timeout: float = 300) -> bool:
    """Start the command, wait until ready() (first output appeared), then a seeded random
    0..max_extra s more, and SIGKILL it. Returns True if it was killed before finishing."""
    proc = subprocess.Popen(command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CLI_ENV)
    t0 = time.monotonic()
    while not ready() and proc.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    time.sleep(rng.uniform(0, max_extra))
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def final_files(root: Path) -> list[Path]:
    """Files under root, asserting every non-final one is a dot-prefixed temp file."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            if p.name.startswith("."):
                assert TEMP.match(p.name), f"unexpected hidden file {p}"
            else:
                out.append(p)
    return out


def assert_final_files_parse(root: Path) -> None:
    """Every visible file is complete: PNG decodes, JSON parses, CSV is whole, checkpoints load."""
    import cv2

    for p in final_files(root):
        if p.suffix == ".png":
            assert cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_UNCHANGED) is not None, p
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv" and p.name != "metrics.csv":
            from twostage.rle import read_csv

            read_csv(p)
        elif p.suffix == ".pt":
            load_checkpoint(p)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                z.files  # noqa: B018 - reading the index fails on a truncated zip


@pytest.fixture(scope="module")
def data(make_phantoms) -> Path:
    return make_phantoms("kill", n=12, size=256, seed=2, test_n=0)


def contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in final_files(root)}


@pytest.mark.parametrize("seed", [0, 1])
def test_prepare_sr_killed_then_rerun(data, tmp_path, seed):
    rng = random.Random(seed)
    ref = tmp_path / "ref"
    run_ok("prepare-sr", data, "--out", ref, "--scale", "4")
    out = tmp_path / "PALM"
    kills = 0
    for _ in range(3):
        kills += kill_when(["prepare-sr", data, "--out", out, "--scale", "4"],
                           lambda: any((out / "manifest").rglob("*.json")) if (out / "manifest").is_dir() else False,
                           rng, 0.4)
        assert_final_files_parse(out)
    assert kills, "never killed mid-run: the test proves nothing"
    # an unfinished palm set is refused by palm training rather than silently used
    if len(list((out / "manifest").rglob("*.json"))) < len(list((ref / "manifest").rglob("*.json"))):
        res = subprocess.run(command("train", "--stage", "palm", "--data", out, "--out", tmp_path / "r", *TINY,
                                     "--epochs", "1"),
                             capture_output=True, text=True, env=CLI_ENV, timeout=300)
        assert res.returncode != 0 and "incomplete" in res.stderr, res.stderr
    run_ok("prepare-sr", data, "--out", out, "--scale", "4")
    a, b = contents(ref), contents(out)
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, differ


def state(path: Path) -> dict:
    return load_checkpoint(path)["state_dict"]


def test_train_killed_then_resumed(data, tmp_path):
    rng = random.Random(7)
    args = ["train", "--stage", "global", "--data", data, "--epochs", "4", *TINY, "--set", "train.val_every=1"]
    ref = tmp_path / "ref"
    run_ok(*args, "--out", ref)
    out = tmp_path / "run"
    kills = 0
    for k in range(6):
        last = out / "last.pt"
        if not last.is_file():  # first: killed while preparing; then: after its first last.pt
            ready = (lambda: (out / "config.yaml").is_file()) if k == 0 else last.is_file
            kills += kill_when([*args, "--out", out], ready, rng, 1.0)
        else:
            mtime = last.stat().st_mtime_ns
            kills += kill_when([*args, "--out", out, "--resume"],
                               lambda: last.stat().st_mtime_ns != mtime, rng, 1.0)
        assert_final_files_parse(out)
        if (out / "last.pt").is_file() and load_checkpoint(out / "last.pt")["meta"]["epoch"] >= 4:
            break
    assert kills, "never killed mid-run"
    if load_checkpoint(out / "last.pt")["meta"]["epoch"] < 4:
        run_ok(*args, "--out", out, "--resume")
    for name in ("last.pt", "best.pt"):
        sa, sb = state(ref / name), state(out / name)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert load_checkpoint(ref / "best.pt")["meta"]["epoch"] == load_checkpoint(out / "best.pt")["meta"]["epoch"]


def test_infer_killed_then_rerun(data, tmp_path, make_tiny_checkpoint):
    from twostage.classes import PALM_CLASSES

    rng = random.Random(3)
    g = make_tiny_checkpoint(tmp_path / "g.pt", "global")
    p = make_tiny_checkpoint(tmp_path / "p.pt", "palm", classes=PALM_CLASSES)
    ref = tmp_path / "ref"
    args = ["infer", data, "--split", "train", "--global", g, "--palm", p, "--fuse"]
    run_ok(*args, "--out", ref / "sub.csv", "--save-probs", ref / "probs")
    out = tmp_path / "out"
    kills = 0
    for _ in range(3):
        kills += kill_when([*args, "--out", out / "sub.csv", "--save-probs", out / "probs"],
                           lambda: (out / "probs").is_dir() and any((out / "probs").glob("*.npz")), rng, 0.5)
        assert not (out / "sub.csv").exists(), "a CSV is visible before the run finished"
        assert_final_files_parse(out)
    assert kills
    run_ok(*args, "--out", out / "sub.csv", "--save-probs", out / "probs")
    assert (out / "sub.csv").read_bytes() == (ref / "sub.csv").read_bytes()
    a, b = contents(ref), contents(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
