"""Whole-image vs patch-trained global models on large phantoms (issue 17), each alone and fused
with one shared palm model: does the palm stage still pay off on a native-resolution global model?

On phantoms of --size (default 1024²; a training set of seed S and a held-out set of seed
S+1000), every step a `python -m twostage ...` subprocess as in `benchmarks/robustness.py`:

    synth DATA, synth HELDOUT, prepare-sr DATA (bicubic x4), train --stage demo-palm (once)
    for each global model, at the same training budget (the same epochs, batch and steps):
        whole-160   --stage demo-global                         the whole image resized to 160²
        whole-320   --stage demo-global --set model.input_size=320    the whole image at 320²
        patch       --stage demo-global-patch --set data.patch_scale=320/size    160² windows of
                    the image resized to 320², slid at inference (3 x 3 windows, overlap 0.5)
        patch-small --stage demo-global-patch                   160² windows at scale 0.5
      train, calibrate (fusion weights on the validation fold, as the demo), evaluate HELDOUT

then, in this process, the seconds per held-out image of each global model alone and fused
(`infer.run`, the models loaded once and warmed up on one image). Tables: carpal mean
and overall of global / fused / calibrated per global model, the palm stage's gain on each,
seconds per image, training seconds. whole-160 and patch cost the same per training step (a
160² input); whole-320 costs about four times as much.

    .venv/bin/python benchmarks/patch.py                        # 1024², ~50 min on 2 cores
    .venv/bin/python benchmarks/patch.py --quick                # smoke test, a few minutes
    .venv/bin/python benchmarks/patch.py --globals whole-160,patch --keep
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustness import Runner, StepFailed, read_marker, remove, summarize

GLOBALS = {
    "whole-160": ("demo-global", []),
    "whole-320": ("demo-global", ["model.input_size=320"]),
    "patch": ("demo-global-patch", ["data.patch_scale={half}"]),
    "patch-small": ("demo-global-patch", []),
}
"""Global models compared: name -> (stage config, --set overrides). `patch`: 160² windows that
cover half the image side ({half} = 320 / size: a 320² working image, as whole-320 sees it,
3 x 3 windows), as `global-patch.yaml` covers half a 2048² radiograph; `patch-small`: the
config's scale 0.5, windows of a quarter of the side at 1024² (too little context to tell the
fingers apart)."""
MARKER = "patch-args.json"


def seconds_per_image(global_ckpt: Path, palm_ckpt: Path, heldout: Path, calibration: Path, out: Path,
                      device: str) -> dict:
    """Held-out seconds per image of the global model alone and of the calibrated fused chain."""
    import logging

    from twostage.inference.chain import TwoStage
    from twostage.inference.infer import find_images, run

    logging.disable(logging.INFO)
    samples = find_images(heldout, "train" if (heldout / "train" / "DCM").is_dir() else None)
    chain = TwoStage.build(global_ckpt, palm_ckpt, device=device, calibration=calibration)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    run(chain, samples[:1], out / "timed-warmup.csv", fuse=True)  # lazy imports, allocator: not timed
    (out / "timed-warmup.csv").unlink()
    for key, fuse in (("global", False), ("fused", True)):
        csv = out / f"timed-{key}.csv"
        csv.unlink(missing_ok=True)
        times[key] = run(chain, samples, csv, fuse=fuse).seconds / len(samples)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/twostage-patch"), help="work folder (default: %(default)s)")
    p.add_argument("--size", type=int, default=1024, help="phantom side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training set and training; held-out: seed+1000")
    p.add_argument("--n", type=int, dest="n_train", help="training images (default 32, --quick 12)")
    p.add_argument("--n-heldout", type=int, help="held-out images (default 16, --quick 6)")
    p.add_argument("--epochs", type=int, help="train.epochs of every stage (default: the configs', --quick 8)")
    p.add_argument("--globals", default=",".join(GLOBALS),
                   help=f"comma-separated global models to compare, of {', '.join(GLOBALS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="12 train / 6 held-out images, 8 epochs: a smoke test")
    p.add_argument("--keep", action="store_true",
                   help="reuse data, palm data, the palm model and global models made with the same arguments")
    p.add_argument("--device", default="cpu", help="torch device of every step (default: %(default)s)")
    p.add_argument("--json", type=Path, help="results (default: WORK/patch.json)")
    a = p.parse_args(argv)
    a.n_train = a.n_train or (12 if a.quick else 32)
    a.n_heldout = a.n_heldout or (6 if a.quick else 16)
    a.epochs = a.epochs or (8 if a.quick else 0)
    names = [n.strip() for n in a.globals.split(",") if n.strip()]
    unknown = [n for n in names if n not in GLOBALS]
    if unknown or not names:
        p.error(f"--globals: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(GLOBALS)}")
    a.json = a.json or a.work / "patch.json"

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    data, heldout, palm_data, runs = a.work / "data", a.work / "heldout", a.work / "palm-data", a.work / "runs"
    run = Runner(a.work / "logs", env)
    base = ["--device", a.device, "--set", f"train.seed={a.seed}"] + \
        (["--set", f"train.epochs={a.epochs}"] if a.epochs else [])
    data_args = {"size": a.size, "seed": a.seed, "n_train": a.n_train, "n_heldout": a.n_heldout}
    kept = a.keep and read_marker(a.work / MARKER) == data_args and (palm_data / "palmset.json").is_file()
    t0 = time.perf_counter()
    print(f"patch benchmark: {a.size}² phantoms, {a.n_train} train (seed {a.seed}) / {a.n_heldout} held-out "
          f"(seed {a.seed + 1000}); globals {', '.join(names)}; work {a.work}", flush=True)
    try:
        if kept:
            run.skip("data", f"--keep: {data}, {heldout}, {palm_data} made with the same arguments")
        else:
            for d in (data, heldout, palm_data, runs):
                remove(d)
            common = ["--size", str(a.size)]
            run("synth", ["synth", "--out", str(data), "--n", str(a.n_train), "--seed", str(a.seed), *common])
            run("synth heldout", ["synth", "--out", str(heldout), "--n", str(a.n_heldout), "--seed",
                                  str(a.seed + 1000), *common])
            run("prepare-sr", ["prepare-sr", str(data), "--out", str(palm_data), "--upscaler", "bicubic",
                               "--stage", "demo-palm", "--device", a.device])
            a.work.mkdir(parents=True, exist_ok=True)
            (a.work / MARKER).write_text(json.dumps(data_args, indent=1))

        def trained(step: str, run_dir: Path, args: list[str]) -> Path:
            marker = {"data": data_args, "args": args}
            if a.keep and kept and (run_dir / "best.pt").is_file() and read_marker(run_dir / MARKER) == marker:
                run.skip(step, f"--keep: {run_dir}/best.pt")
            else:
                remove(run_dir)
                run(step, args)
                (run_dir / MARKER).write_text(json.dumps(marker, indent=1))
            return run_dir / "best.pt"

        palm = trained("train palm", runs / "palm", ["train", "--stage", "demo-palm", "--data", str(palm_data),
                                                     "--out", str(runs / "palm"), *base])
        results = {}
        for name in names:
            stage, sets = GLOBALS[name]
            sets = [kv.format(half=f"{320 / a.size:g}") for kv in sets]
            g_dir, calib, e_dir = runs / name, runs / name / "calibration", runs / name / "evaluation"
            g = trained(f"train {name}", g_dir, ["train", "--stage", stage, "--data", str(data), "--out", str(g_dir),
                                                 *base, *(x for kv in sets for x in ("--set", kv))])
            remove(calib)
            remove(e_dir)
            run(f"calibrate {name}", ["calibrate", str(data), "--global", str(g), "--palm", str(palm), "--out",
                                      str(calib), "--thresholds-grid", "0.5", "--device", a.device])
            run(f"evaluate {name}", ["evaluate", str(heldout), "--global", str(g), "--palm", str(palm), "--out",
                                     str(e_dir), "--calibration", str(calib), "--pictures", "0", "--device", a.device])
            ev = json.loads((e_dir / "evaluation.json").read_text())
            t = time.perf_counter()
            per_image = seconds_per_image(g, palm, heldout, calib, e_dir, a.device)
            run.times[f"timing {name}"] = time.perf_counter() - t
            results[name] = {"stage": stage, "set": sets, "scores": summarize(ev),
                             "seconds_per_image": per_image, "train_seconds": run.times[f"train {name}"]}
    except StepFailed as e:
        print(f"patch benchmark failed: {e}", file=sys.stderr)
        return 1
    summary = {"argv": sys.argv[1:] if argv is None else argv, **data_args, "epochs": a.epochs or "config",
               "device": a.device, "globals": results, "times": run.times, "commands": run.commands,
               "palm_train_seconds": run.times["train palm"], "seconds": time.perf_counter() - t0}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(summary, indent=1))

    print(f"\nheld-out Dice ({a.n_heldout} images of {a.size}², seed {a.seed + 1000}); one palm model "
          f"(trained {run.times['train palm']:.0f} s); fused = calibrated fusion weights")
    print(f"{'global model':<12}{'carpal':>8}{'fused':>8}{'gain':>8}{'overall':>9}{'fused':>8}{'gain':>8}"
          f"{'worst carpal change':>28}{'s/img':>8}{'fused':>8}{'train s':>9}")
    for name, r in results.items():
        s, c = r["scores"], r["scores"]["calibrated"] or r["scores"]["fused"]
        g, t = s["global"], r["seconds_per_image"]
        print(f"{name:<12}{g['carpal_mean']:>8.4f}{c['carpal_mean']:>8.4f}{c['carpal_gain']:>+8.4f}"
              f"{g['overall']:>9.4f}{c['overall']:>8.4f}{c['overall_gain']:>+8.4f}"
              f"{c['worst_class'] + ' ' + format(c['worst_change'], '+.4f'):>28}"
              f"{t['global']:>8.2f}{t['fused']:>8.2f}{r['train_seconds']:>9.0f}")
    print(f"\ntotal {summary['seconds'] / 60:.1f} min; numbers: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
