"""Pseudo-labelling on phantoms (issue 18): does a global model trained on a labelled set L plus
pseudo-labels of an unlabelled set U beat one trained on L alone, at the same number of steps?

Three phantom sets of three seeds: L (labelled, seed S), U (unlabelled: the test split of a
dataset of seed S+2000, which has no annotations and, like the competition's test set, other
person IDs than L), H (held-out, seed S+1000). Every step a `python -m twostage ...`
subprocess, as a user runs them:

    synth L, U, H; prepare-sr L; train --stage demo-palm (on L, shared by both global models)
    train --stage demo-global --data L                                   -> global-L
    infer U --global global-L --palm palm --fuse --save-probs            (calibrated fusion)
    pseudo-label U --csv ... --probs ... [--min-confidence T]            -> P
    train --stage demo-global --data L P, epochs chosen for global-L's number of steps -> global-LP
    calibrate (fusion weights, validation fold of L) and evaluate H, for each global model

and prints held-out carpal mean / overall of each global model alone and fused, and the
steps each trained. The phantoms are the demo's, not tuned for this benchmark.

    .venv/bin/python benchmarks/pseudo.py                       # 512², ~15 min on 2 cores
    .venv/bin/python benchmarks/pseudo.py --quick               # smoke test
    .venv/bin/python benchmarks/pseudo.py --min-confidence 0.8 --keep
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

MARKER = "pseudo-args.json"


def train_images(run: Path) -> int:
    """Training images of a finished run (its checkpoint's sources)."""
    from twostage.checkpoint import load_checkpoint

    return sum(m["images"] for m in load_checkpoint(run / "last.pt")["meta"]["sources"])


def steps(images: int, batch: int, epochs: int) -> int:
    """Optimiser steps of a single-process run (the loader drops a last partial batch)."""
    return epochs * (images // batch if images > batch else 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/twostage-pseudo"), help="work folder (default: %(default)s)")
    p.add_argument("--size", type=int, default=512, help="phantom side (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of L and of training; H: +1000, U: +2000")
    p.add_argument("--n", type=int, dest="n_labelled", help="images in L (default 32, --quick 12)")
    p.add_argument("--n-unlabelled", type=int, help="images in U (default 32, --quick 12)")
    p.add_argument("--n-heldout", type=int, help="images in H (default 16, --quick 6)")
    p.add_argument("--epochs", type=int, help="epochs of the L-only global model and the palm model (default: the "
                                              "configs', --quick 8); the L+P model gets the same number of steps")
    p.add_argument("--min-confidence", type=float, help="pseudo-label --min-confidence (default: none)")
    p.add_argument("--pseudo-weight", type=float, default=1.0,
                   help="data.source_weights of the pseudo-labelled images (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small sets and 8 epochs: a smoke test")
    p.add_argument("--keep", action="store_true", help="reuse the data, palm model and L-only model if made "
                                                       "with the same arguments")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--json", type=Path, help="results (default: WORK/pseudo.json)")
    a = p.parse_args(argv)
    a.n_labelled = a.n_labelled or (12 if a.quick else 32)
    a.n_unlabelled = a.n_unlabelled or (12 if a.quick else 32)
    a.n_heldout = a.n_heldout or (6 if a.quick else 16)
    a.epochs = a.epochs or (8 if a.quick else None)
    a.json = a.json or a.work / "pseudo.json"

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    w = a.work
    L, U, H, palm_data, runs = w / "L", w / "U", w / "H", w / "palm-data", w / "runs"
    run = Runner(w / "logs", env)
    base = ["--device", a.device, "--set", f"train.seed={a.seed}"]
    epochs = ["--set", f"train.epochs={a.epochs}"] if a.epochs else []
    data_args = {"size": a.size, "seed": a.seed, "n": [a.n_labelled, a.n_unlabelled, a.n_heldout],
                 "epochs": a.epochs}
    kept = a.keep and read_marker(w / MARKER) == data_args and (runs / "global-L" / "best.pt").is_file()
    t0 = time.perf_counter()
    print(f"pseudo-label benchmark: {a.size}² phantoms, L {a.n_labelled} (seed {a.seed}), U {a.n_unlabelled} "
          f"(seed {a.seed + 2000}), H {a.n_heldout} (seed {a.seed + 1000}); work {w}", flush=True)
    try:
        if kept:
            run.skip("L, U, H, palm, global-L", f"--keep: made with the same arguments in {w}")
        else:
            for d in (L, U, H, palm_data, runs):
                remove(d)
            for name, folder, n, seed, test in (
                    ("L", L, a.n_labelled, a.seed, 0), ("H", H, a.n_heldout, a.seed + 1000, 0),
                    # U: synth numbers a dataset's IDs from ID001, train split first; its test split holds
                    # the IDs after them, which L does not have (L has no more images than this train split)
                    ("U", U, max(a.n_labelled, a.n_unlabelled), a.seed + 2000, a.n_unlabelled)):
                run(f"synth {name}", ["synth", "--out", str(folder), "--n", str(n), "--test-n", str(test),
                                      "--seed", str(seed), "--size", str(a.size)])
            run("prepare-sr L", ["prepare-sr", str(L), "--out", str(palm_data), "--upscaler", "bicubic",
                                 "--stage", "demo-palm", "--device", a.device])
            run("train palm", ["train", "--stage", "demo-palm", "--data", str(palm_data), "--out",
                               str(runs / "palm"), *base, *epochs])
            run("train global-L", ["train", "--stage", "demo-global", "--data", str(L), "--out",
                                   str(runs / "global-L"), *base, *epochs])
            w.mkdir(parents=True, exist_ok=True)
            (w / MARKER).write_text(json.dumps(data_args, indent=1))
        palm, g_l = runs / "palm" / "best.pt", runs / "global-L" / "best.pt"
        run("calibrate global-L", ["calibrate", str(L), "--global", str(g_l), "--palm", str(palm), "--out",
                                   str(runs / "global-L" / "calibration"), "--thresholds-grid", "0.5",
                                   "--device", a.device])
        pred, probs, pseudo = runs / "U-fused.csv", runs / "U-probs", w / "P"
        for f in (pred, probs, pseudo, runs / "global-LP"):
            remove(f) if f.is_dir() else f.unlink(missing_ok=True)
        run("infer U", ["infer", str(U), "--global", str(g_l), "--palm", str(palm), "--fuse", "--out", str(pred),
                        "--save-probs", str(probs), "--calibration", str(runs / "global-L" / "calibration"),
                        "--split", "test", "--device", a.device])
        run("pseudo-label U", ["pseudo-label", str(U), "--csv", str(pred), "--probs", str(probs), "--out",
                               str(pseudo), "--split", "test",
                               *(["--min-confidence", str(a.min_confidence)] if a.min_confidence else [])])
        record = json.loads((pseudo / "pseudo.json").read_text())
        import yaml

        cfg = yaml.safe_load((runs / "global-L" / "config.yaml").read_text())["train"]
        batch, images_l = cfg["batch_size"], train_images(runs / "global-L")
        steps_l = steps(images_l, batch, cfg["epochs"])
        images_lp = images_l + record["images"] - len(record.get("dropped_images", []))
        # the same number of steps: L+P has more images per epoch, so fewer epochs
        epochs_lp = max(1, round(steps_l / steps(images_lp, batch, 1)))
        run("train global-LP", ["train", "--stage", "demo-global", "--data", str(L), str(pseudo), "--out",
                                str(runs / "global-LP"), *base, "--set", f"train.epochs={epochs_lp}",
                                "--set", f"data.source_weights=[1, {a.pseudo_weight}]"])
        g_lp = runs / "global-LP" / "best.pt"
        run("calibrate global-LP", ["calibrate", str(L), "--global", str(g_lp), "--palm", str(palm), "--out",
                                    str(runs / "global-LP" / "calibration"), "--thresholds-grid", "0.5",
                                    "--device", a.device])
        results = {}
        for name, g in (("global-L", g_l), ("global-LP", g_lp)):
            e_dir = runs / name / "evaluation"
            remove(e_dir)
            run(f"evaluate {name}", ["evaluate", str(H), "--global", str(g), "--palm", str(palm), "--out", str(e_dir),
                                     "--calibration", str(runs / name / "calibration"), "--pictures", "0",
                                     "--device", a.device])
            ev = json.loads((e_dir / "evaluation.json").read_text())
            epochs_run = cfg["epochs"] if name == "global-L" else epochs_lp
            results[name] = {"scores": summarize(ev), "epochs": epochs_run,
                             "steps": steps(train_images(runs / name), batch, epochs_run)}
    except StepFailed as e:
        print(f"pseudo-label benchmark failed: {e}", file=sys.stderr)
        return 1
    summary = {"argv": sys.argv[1:] if argv is None else argv, **data_args, "min_confidence": a.min_confidence,
               "pseudo_weight": a.pseudo_weight, "pseudo": {k: record.get(k) for k in ("images", "dropped_images")},
               "dropped_classes": sum(len(v) for v in record.get("dropped_classes", {}).values()),
               "results": results, "times": run.times, "commands": run.commands,
               "seconds": time.perf_counter() - t0}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(summary, indent=1))
    print(f"\nheld-out Dice ({a.n_heldout} images, seed {a.seed + 1000}); pseudo-labels: {images_lp - images_l} "
          f"images of U, "
          f"{summary['dropped_classes']} classes dropped; fused = calibrated fusion with one palm model")
    print(f"{'global model':<14}{'steps':>7}{'carpal':>8}{'overall':>9}{'fused carpal':>14}{'fused overall':>15}")
    for name, r in results.items():
        s = r["scores"]
        f = s["calibrated"] or s["fused"]
        print(f"{name:<14}{r['steps']:>7}{s['global']['carpal_mean']:>8.4f}{s['global']['overall']:>9.4f}"
              f"{f['carpal_mean']:>14.4f}{f['overall']:>15.4f}")
    lo, lp = results["global-L"]["scores"], results["global-LP"]["scores"]
    print(f"L+P minus L: global carpal {lp['global']['carpal_mean'] - lo['global']['carpal_mean']:+.4f}, overall "
          f"{lp['global']['overall'] - lo['global']['overall']:+.4f}; fused carpal "
          f"{(lp['calibrated'] or lp['fused'])['carpal_mean'] - (lo['calibrated'] or lo['fused'])['carpal_mean']:+.4f}, "
          f"overall {(lp['calibrated'] or lp['fused'])['overall'] - (lo['calibrated'] or lo['fused'])['overall']:+.4f}")
    print(f"total {summary['seconds'] / 60:.1f} min; numbers: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
