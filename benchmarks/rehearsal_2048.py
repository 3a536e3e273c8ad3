"""The real-scale path rehearsed on CPU: 2048² radiographs through every command with the
shipped real configs (stages/sr.yaml, stages/global.yaml, stages/palm.yaml).

Nothing is changed in those configs but what this machine forces, each as a --set:
  * counts: --n training images (one ID-grouped fold validates), --test-n images inferred,
    --set train.epochs=1 (one epoch = n_train / batch steps); train-sr: 5 steps, 1 ID held out;
  * model.encoder_weights=none: nothing downloads here (a user's first run fills the hub
    cache with the ImageNet weights; see docs/commands.md, `twostage train`, model.encoder_weights);
  * train.batch_size=2 (--batch-size): the configs' batch 4 is sized for a GPU with AMP; on
    the CPU there is no AMP, fp32 activations are twice the size and batch 4 would not fit
    24 GB.
SR is an RRDBNet x4 with the official RealESRGAN_x4plus architecture and random weights,
saved as the official file is and pinned in a manifest of its own (speed and memory do not
depend on the weight values), tiled (--tile) in prepare-sr and infer.

Every command runs as `python -m twostage ...` in its own process; the table gives its wall
time and its own peak RSS (os.wait4), and the training rows the epoch time from metrics.csv.

    .venv/bin/python benchmarks/rehearsal_2048.py                  # ~45 min on 2 idle cores
    .venv/bin/python benchmarks/rehearsal_2048.py --keep runs/rehearsal   # resumable: prepare-sr skips done crops
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def run(name: str, args: list[str], rows: list[dict], env: dict) -> dict:
    """Run `python -m twostage ARGS`; record wall time and the child's own peak RSS."""
    cmd = [sys.executable, "-m", "twostage", *args]
    print(f"\n$ twostage {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"rehearsal: `twostage {' '.join(args)}` failed with exit code {proc.returncode}")
    row = {"step": name, "seconds": wall, "peak_rss_gib": usage.ru_maxrss * 1024 / GIB}
    rows.append(row)
    return row


def make_rrdb_weights(directory: Path, names: tuple[str, ...] = ("RealESRGAN_x4plus",)) -> None:
    """The official architectures of shipped manifest entries (RealESRGAN_x4plus by default),
    random weights, saved like the official files, with a manifest pinning their sha256."""
    import torch
    import yaml

    from twostage.io.files import sha256_file
    from twostage.sr import weights

    shipped = weights.load_manifest(weights.shipped_manifest())
    entries = {}
    for name in names:
        spec = shipped[name]
        torch.manual_seed(0)
        path = directory / spec.file
        torch.save({"params_ema": weights.build_model(spec).state_dict()}, path)
        entries[name] = {"file": spec.file, "arch": spec.arch, "scale": spec.scale, "url": spec.url,
                         "sha256": sha256_file(path), "params": spec.params}
    (directory / "manifest.yaml").write_text(yaml.safe_dump({"weights": entries}))


def work_folders(work: Path) -> tuple[Path, Path, Path, Path]:
    """data, palmdata, weights (holding the RRDBNet x4 file) and runs under `work`. In a kept
    folder prepare-sr resumes (finished crops are skipped) and the data is made anew."""
    work.mkdir(parents=True, exist_ok=True)
    data, palm, wdir, runs = work / "data", work / "palmdata", work / "weights", work / "runs"
    wdir.mkdir(exist_ok=True)
    make_rrdb_weights(wdir)
    shutil.rmtree(data, ignore_errors=True)
    return data, palm, wdir, runs


def epoch_seconds(run_dir: Path) -> str:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[-1]["seconds"] if rows else "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4, help="training images (default 4: 2 train, 2 validate)")
    p.add_argument("--test-n", type=int, default=1, help="test images inferred (default 1)")
    p.add_argument("--batch-size", type=int, default=2, help="training batch (default 2, see above)")
    p.add_argument("--tile", type=int, default=256, help="Real-ESRGAN tile (default 256)")
    p.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    a = p.parse_args(argv)

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = a.keep or Path(tmp)
        data, palm, wdir, runs = work_folders(work)
        real = ["--set", "model.encoder_weights=none", "--epochs", "1", "--batch-size", str(a.batch_size),
                "--device", "cpu"]
        rows: list[dict] = []
        run("synth 2048²", ["synth", "--out", str(data), "--n", str(a.n), "--test-n", str(a.test_n),
                            "--size", "2048", "--overwrite"], rows, env)
        t = run("train-sr (5 steps)", ["train-sr", str(data), "--out", "rehearsal-x4", "--stage", "sr", "--steps", "5",
                                        "--device", "cpu", "--weights-dir", str(wdir), "--run", str(runs / "sr"),
                                        "--set", "data.holdout=1", "--set", "train.val_every=5", "--overwrite"],
                rows, env)
        t["epoch_s"] = ""
        run("prepare-sr (RRDBNet x4)", ["prepare-sr", str(data), "--out", str(palm), "--upscaler",
                                        "RealESRGAN_x4plus", "--tile", str(a.tile), "--weights-dir", str(wdir),
                                        "--overwrite"], rows, env)
        g = run("train global (1 epoch)", ["train", "--stage", "global", "--data", str(data),
                                           "--out", str(runs / "global"), *real], rows, env)
        g["epoch_s"] = epoch_seconds(runs / "global")
        pm = run("train palm (1 epoch)", ["train", "--stage", "palm", "--data", str(palm),
                                          "--out", str(runs / "palm"), *real], rows, env)
        pm["epoch_s"] = epoch_seconds(runs / "palm")
        run("infer global only", ["infer", str(data), "--global", str(runs / "global" / "last.pt"),
                                  "--out", str(work / "global.csv")], rows, env)
        run("infer --fuse", ["infer", str(data), "--global", str(runs / "global" / "last.pt"),
                             "--palm", str(runs / "palm" / "last.pt"), "--fuse", "--tile", str(a.tile),
                             "--weights-dir", str(wdir), "--out", str(work / "fused.csv")], rows, env)
        lines = (work / "fused.csv").read_text().count("\n") - 1
        split = json.loads((runs / "global" / "split.json").read_text())["folds"]
        folds = [split.get(png.parent.name) for png in (data / "train" / "DCM").rglob("*.png")]
        n_train = sum(f != 0 for f in folds)
        print(f"\nrehearsal at 2048² (real configs; {a.n} training images, {a.test_n} test images, "
              f"batch {a.batch_size}, CPU threads {os.cpu_count()}):")
        print(f"{'step':<28}{'seconds':>9}{'epoch s':>9}{'peak RSS GiB':>14}")
        for r in rows:
            print(f"{r['step']:<28}{r['seconds']:>9.1f}{str(r.get('epoch_s', '')):>9}{r['peak_rss_gib']:>14.2f}")
        print(f"fused CSV: {lines} rows ({a.test_n} x 29); {n_train} training images per epoch "
              f"({-(-n_train // a.batch_size)} steps), {len(folds) - n_train} validated at 2048²")
    return 0


if __name__ == "__main__":
    sys.exit(main())
