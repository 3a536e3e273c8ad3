"""The GPU check: what only a CUDA machine can show, as one script (never a CI requirement).

1. the CUDA-only tests (`pytest -k cuda`);
2. a few training steps of both real stages (stages/global.yaml, stages/palm.yaml: AMP and
   channels-last on, their own batch size) on 2048² phantoms, after prepare-sr with an
   RRDBNet x4 (official architecture, random weights) tiled in fp16 on the GPU; and 20 steps of
   `train-sr --stage sr` (stages/sr.yaml: the Real-ESRGAN degradations on the GPU, 256² patches);
3. `infer --fuse` on the GPU with and without --fp16 against the same command on the CPU:
   per-class Dice between the CSVs (target >= 0.999 for every class) and the share of
   non-empty masks, so an all-empty comparison cannot pass unnoticed;
4. `benchmarks/sr.py` (Real-ESRGAN tiled, fp16) and `benchmarks/infer.py` at 2048² on the GPU;
5. `benchmarks/gpu_train.py`: whether the GPU or the loader sets the pace of training at the
   real configs (epoch time against the compute-only step, GPU utilisation).

The encoders start from random weights (model.encoder_weights=none): the device machine
has no network. Each step prints its wall time; the summary lists the peak GPU memory of
the in-process infer runs.

    .venv/bin/python benchmarks/gpu_check.py                    # on a CUDA machine, ~10 min
    .venv/bin/python benchmarks/gpu_check.py --device cpu --size 512 --n 6 \\
        --train-set model.input_size=128 --skip-benchmarks      # the script itself, on a CPU
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rehearsal_2048 import run, work_folders  # noqa: E402  (the same runner and folders)

ROOT = Path(__file__).resolve().parents[1]


def csv_dice(a: Path, b: Path, size: int) -> tuple[dict[str, float], float]:
    """Per-class mean Dice between two CSVs of the same images, and the share of non-empty masks."""
    import numpy as np

    from twostage.classes import CLASSES
    from twostage.metrics import dice_per_class
    from twostage.rle import decode, read_csv

    ra, rb = read_csv(a), read_csv(b)
    dice, nonempty = [], []
    for name in sorted(ra):
        ma, mb = (np.stack([decode(r[name][c], (size, size)) for c in CLASSES]) for r in (ra, rb))
        dice.append(dice_per_class(mb, ma))
        nonempty.append(ma.reshape(len(CLASSES), -1).any(1))
    return dict(zip(CLASSES, np.mean(dice, 0).tolist())), float(np.mean(nonempty))


def infer_in_process(args: dict, device: str, fp16: bool) -> tuple[float, float]:
    """One `twostage.infer.infer` call; returns (seconds, peak GPU memory in GiB)."""
    import torch

    from twostage.infer import infer

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    infer(**args, device=device, fp16=fp16)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=2048, help="phantom side (default 2048)")
    p.add_argument("--n", type=int, default=10, help="training images (default 10: 2 steps at batch 4)")
    p.add_argument("--test-n", type=int, default=2, help="images inferred (default 2)")
    p.add_argument("--tile", type=int, default=512, help="Real-ESRGAN tile (default 512)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for both training runs (e.g. a smaller input for a CPU trial)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-benchmarks", action="store_true")
    p.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    a = p.parse_args(argv)

    import torch

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available here (use --device cpu to try the script itself)")
    print(f"torch {torch.__version__}, device {a.device}"
          + (f" ({torch.cuda.get_device_name(a.device)})" if cuda else ""), flush=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    failures: list[str] = []
    if not a.skip_tests:
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-k", "cuda", str(ROOT / "tests")],
                            env=env).returncode
        print(f"CUDA-only tests: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failures.append(f"CUDA tests exit {rc}")

    with tempfile.TemporaryDirectory() as tmp:
        data, palm, wdir, runs = work_folders(a.keep or Path(tmp))
        rows: list[dict] = []
        train = ["--set", "model.encoder_weights=none", "--epochs", "1", "--device", a.device,
                 *(x for kv in a.train_set for x in ("--set", kv))]
        run("synth", ["synth", "--out", str(data), "--n", str(a.n), "--test-n", str(a.test_n),
                      "--size", str(a.size), "--overwrite"], rows, env)
        run("prepare-sr (RRDBNet x4" + (", fp16)" if cuda else ")"),
            ["prepare-sr", str(data), "--out", str(palm), "--upscaler", "RealESRGAN_x4plus", "--tile",
             str(a.tile), "--device", a.device, "--weights-dir", str(wdir), "--overwrite"], rows, env)
        run("train-sr (20 steps)", ["train-sr", str(data), "--out", "gpu-check-x4", "--stage", "sr", "--steps", "20",
                                    "--device", a.device, "--weights-dir", str(wdir), "--run", str(runs / "sr"),
                                    "--set", "data.holdout=1", "--set", "train.val_every=20", "--overwrite"],
            rows, env)
        run("train global" + (" (AMP, channels-last)" if cuda else ""), ["train", "--stage", "global", "--data", str(data),
                                                  "--out", str(runs / "global"), *train], rows, env)
        run("train palm" + (" (AMP, channels-last)" if cuda else ""), ["train", "--stage", "palm", "--data", str(palm),
                                                "--out", str(runs / "palm"), *train], rows, env)

        common = {"images": data, "global_ckpt": runs / "global" / "last.pt", "palm_ckpt": runs / "palm" / "last.pt",
                  "fuse": True, "upscaler_tile": a.tile, "weights_dir": wdir}
        csvs, peaks = {}, {}
        modes = [("cpu", "cpu", False)] + ([(a.device, a.device, False), ("fp16", a.device, True)] if cuda else [])
        for label, device, fp16 in modes:
            csvs[label] = runs / f"fused-{label}.csv"
            secs, peaks[label] = infer_in_process({**common, "out": csvs[label]}, device, fp16)
            rows.append({"step": f"infer --fuse on {label} (in-process)", "seconds": secs, "peak_rss_gib": None})
            print(f"infer --fuse on {label}: {secs:.1f} s for {a.test_n} images", flush=True)
        for label in csvs:
            if label == "cpu":
                continue
            dice, share = csv_dice(csvs["cpu"], csvs[label], a.size)
            worst = min(dice, key=dice.get)
            ok = dice[worst] >= 0.999
            print(f"{label} vs cpu: worst class {worst} Dice {dice[worst]:.5f} (target >= 0.999), "
                  f"mean {sum(dice.values()) / len(dice):.5f}; non-empty masks on cpu: {share:.0%}"
                  f"{'' if ok else '  FAIL'}", flush=True)
            if not ok:
                failures.append(f"{label} vs cpu Dice {dice[worst]:.5f} ({worst})")

        print(f"\n{'step':<40}{'seconds':>9}{'peak RSS GiB':>14}")
        for r in rows:
            rss = "-" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.2f}"
            print(f"{r['step']:<40}{r['seconds']:>9.1f}{rss:>14}")
        if cuda:
            print("peak GPU memory of infer --fuse: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in peaks.items()))

    if not a.skip_benchmarks:
        for script, extra in (("sr.py", ["--size", "512", "--tiles", "0,256,512"]),
                              ("infer.py", ["--size", str(a.size), "--images", "3", "--global-input", "1024",
                                            "--palm-input", "1024"]),
                              ("gpu_train.py", ["--size", str(a.size), "--n", "64", "--epochs", "4"])):
            print(f"\n$ benchmarks/{script} --device {a.device} {' '.join(extra)}", flush=True)
            rc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--device", a.device, *extra],
                                env=env).returncode
            if rc != 0:
                failures.append(f"benchmarks/{script} exit {rc}")
    print("\ngpu_check: " + ("all checks passed" if not failures else "FAILED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
