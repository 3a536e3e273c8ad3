"""Disk and concurrency: a full disk or a read-only folder during any write leaves no file under
the final name (and an existing one as it was) and is one error line; two runs writing the same
output do not both write it (a run lock; a killed run's lock blocks nothing).

The full disk is real: the temporary file every write goes through is made a link to
/dev/full, so the kernel answers ENOSPC to the writer itself (numpy, torch, csv, OpenCV's PNG
bytes). Tests run as root, for whom a chmod-ed folder is still writable, so a read-only folder
is a read-only tmpfs where mounting is allowed (skipped otherwise) and, everywhere, the EROFS
a read-only mount answers when the temporary file is created.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLI_ENV, twostage_cmd

from twostage.cli import main
from twostage.errors import TwostageError


@pytest.fixture(scope="module")
def world(make_world) -> dict:
    return make_world("disk", size=96, seed=4, palm=False)


@pytest.fixture
def full_disk(monkeypatch):
    """Every temporary file of `io.files.atomic_path` is a link to /dev/full: writes fail with ENOSPC."""
    import twostage.io.files

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, path = real(*args, **kwargs)
        os.close(fd)
        os.unlink(path)
        os.symlink("/dev/full", path)
        return os.open(path, os.O_WRONLY), path

    monkeypatch.setattr(twostage.io.files.tempfile, "mkstemp", mkstemp)


@pytest.fixture
def read_only_mkstemp(monkeypatch):
    """Creating the temporary file fails as on a read-only mount (EROFS)."""
    import twostage.io.files

    def mkstemp(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir or ".", "tmp"))

    monkeypatch.setattr(twostage.io.files.tempfile, "mkstemp", mkstemp)


def error_lines(capfd) -> list[str]:
    """stderr lines of the command that just ran (fd level: native libraries included)."""
    return [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def _writers(tmp: Path):
    """(final path, write) of every kind of atomic write the commands make."""
    from twostage.checkpoint import save_checkpoint
    from twostage.inference.probs import write_probs
    from twostage.io.files import write_json_atomic, write_png_atomic, write_text_atomic
    from twostage.rle import write_csv

    meta = {"stage": "global", "classes": ["a"], "model": {}, "input_size": 8, "normalization": {}}
    return {
        "csv": (tmp / "out.csv", lambda p: write_csv(p, [("a.png", [""] * 29)])),
        "json": (tmp / "report.json", lambda p: write_json_atomic(p, {"x": list(range(5000))})),
        "text": (tmp / "config.yaml", lambda p: write_text_atomic(p, "x: 1\n" * 3000)),
        "png": (tmp / "crop.png", lambda p: write_png_atomic(p, np.arange(4096, dtype=np.uint8).reshape(64, 64))),
        "probs": (tmp / "a.npz", lambda p: write_probs(p, torch.rand(29, 32, 32))),
        "checkpoint": (tmp / "best.pt", lambda p: save_checkpoint(p, {"w": torch.zeros(4096)}, meta)),
    }


@pytest.mark.parametrize("kind", ["csv", "json", "text", "png", "probs", "checkpoint"])
@pytest.mark.parametrize("failure", ["full_disk", "read_only_mkstemp"])
def test_failed_write_leaves_the_old_file(tmp_path, kind, failure, request):
    path, write = _writers(tmp_path)[kind]
    path.write_bytes(b"the previous version")
    request.getfixturevalue(failure)
    reason = "No space left on device" if failure == "full_disk" else "Read-only file system"
    with pytest.raises(TwostageError, match=f"^{path}: cannot write \\({reason}\\); nothing was written"):
        write(path)
    assert path.read_bytes() == b"the previous version" and leftovers(tmp_path) == []


def test_infer_on_a_full_disk(world, tmp_path, full_disk, capfd):
    """The CLI: one error line, exit 2, no CSV, no temporary file left."""
    out = tmp_path / "out.csv"
    assert main(["infer", str(world["data"]), "--split", "train", "--global", str(world["global"]),
                 "--out", str(out)]) == 2
    assert error_lines(capfd) == [f"error: {out}: cannot write (No space left on device); "
                                  "nothing was written under this name"]
    assert not out.exists() and leftovers(tmp_path) == []


def test_errors_of_other_files_are_not_called_write_errors(tmp_path):
    """Inside an atomic write, an OSError about another file is not reported as this write's."""
    from twostage.io.files import atomic_path

    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "out.csv"):
            open(tmp_path / "missing-input.png", "rb")
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- a real small / read-only file system

@pytest.fixture
def tmpfs(tmp_path):
    """mount(folder, options): a tmpfs at tmp_path/mnt (needs CAP_SYS_ADMIN; skipped without)."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_infer_into_a_real_full_file_system(world, tmpfs, capfd):
    """A 16 KiB tmpfs: the CSV does not fit; one line, no partial CSV, the earlier CSV intact."""
    fs = tmpfs("size=16k")
    out = fs / "out.csv"
    out.write_text("image_name,class,rle\nkeep-me,finger-1,1 2\n")
    before = out.read_bytes()
    (fs / "filler").write_bytes(b"x" * 8192)
    assert main(["infer", str(world["data"]), "--split", "train", "--global", str(world["global"]),
                 "--out", str(out)]) == 2
    assert error_lines(capfd) == [f"error: {out}: cannot write (No space left on device); "
                                  "nothing was written under this name"]
    assert out.read_bytes() == before and leftovers(fs) == []


def test_outputs_in_a_real_read_only_folder(world, tmpfs, capfd):
    """A read-only mount: infer, prepare-sr and train each stop with one line naming what they could not write."""
    ro = tmpfs("ro,size=64k")
    for args, name in [(["infer", world["data"], "--split", "train", "--global", world["global"], "--out", ro / "o.csv"],
                        ro / "o.csv"),
                       (["prepare-sr", world["data"], "--out", ro / "PALM", "--input-size", "64"], ro / "PALM"),
                       (["train", "--stage", "demo-global", "--data", world["data"], "--out", ro / "run", "--epochs", "1"],
                        ro / "run")]:
        assert main(list(map(str, args))) == 2
        lines = error_lines(capfd)
        assert len(lines) == 1 and lines[0].startswith(f"error: {name}: cannot ") and "Read-only file system" in lines[0]
        assert list(ro.iterdir()) == []


# --------------------------------------------------------------------------- concurrent runs

HOLD = """
import json, sys, time
from twostage.io.locks import run_lock
with run_lock(sys.argv[1], "twostage infer", tag=sys.argv[2], info=json.loads(sys.argv[3])):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder():
    """holder(target, tag="", info=None): another process holding a run lock; killed at the end."""
    procs = []

    def start(target: Path, tag: str = "", info: dict | None = None) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(target), tag, json.dumps(info or {})],
                             stdout=subprocess.PIPE, text=True, env=CLI_ENV)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_second_infer_into_the_same_csv_is_refused(world, tmp_path, holder, capsys):
    out = tmp_path / "out.csv"
    other = holder(out)
    args = ["infer", str(world["data"]), "--split", "train", "--global", str(world["global"]), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"`twostage infer` (pid {other.pid} on" in err and "is writing it" in err and not out.exists()
    other.kill()
    other.wait()  # killed with SIGKILL: its lock file stays, and blocks nothing
    assert (tmp_path / ".out.csv.lock").exists()
    assert main(args) == 0 and out.is_file() and not (tmp_path / ".out.csv.lock").exists()


def test_save_probs_folder_is_locked_too(world, tmp_path, holder):
    from twostage.inference.infer import infer

    other = holder(tmp_path / "probs")
    with pytest.raises(TwostageError, match=f"pid {other.pid}"):
        infer(world["data"], world["global"], tmp_path / "out.csv", split="train", save_probs=tmp_path / "probs")
    assert not (tmp_path / "out.csv").exists()


def test_two_infers_at_once(world, tmp_path):
    """Two real infer processes into one CSV, started together: each either writes the whole CSV
    or is refused by the lock; the CSV is the one a single run writes."""
    from twostage.inference.infer import infer

    ref = tmp_path / "ref.csv"
    infer(world["data"], world["global"], ref, split="train")
    out = tmp_path / "out.csv"
    cmd = twostage_cmd("infer", world["data"], "--split", "train", "--global", world["global"], "--out", out)
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=CLI_ENV) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc == 0 or (rc == 2 and "is writing it" in err and "Traceback" not in err), err
    assert any(rc == 0 for rc, _ in results) and out.read_bytes() == ref.read_bytes()


def test_prepare_sr_shards(world, tmp_path, holder):
    """The same shard twice is refused; another shard with the same settings runs beside it;
    other settings while a run is live are refused, naming it."""
    from twostage.box import DEFAULT_MARGIN
    from twostage.data.palm_set import SETTING_KEYS
    from twostage.sr.prepare import prepare_sr
    from twostage.sr.upscale import make_upscaler

    out = tmp_path / "PALM"
    settings = {**make_upscaler("bicubic", 2).record(), "margin": DEFAULT_MARGIN, "context": 1.5}
    assert set(settings) == set(SETTING_KEYS)
    other = holder(out, "shard-0-of-2")
    with pytest.raises(TwostageError, match=f"pid {other.pid}"):
        prepare_sr(world["data"], out, scale=2, shard="0/2")
    other.kill()
    other.wait()
    same = holder(out, "shard-0-of-2", {"settings": settings})
    assert prepare_sr(world["data"], out, scale=2, shard="1/2")["done"] >= 1
    with pytest.raises(TwostageError, match=f"pid {same.pid} .* with other settings"):
        prepare_sr(world["data"], out, scale=3, shard="1/2", overwrite=True)
    same.kill()
    same.wait()
    assert prepare_sr(world["data"], out, scale=2, shard="0/2")["done"] >= 1
