"""Does super resolution help the palm model (issue 19)? A palm model trained on crops of a
network `twostage train-sr` made against one trained on bicubic crops of the same images.

Runs (or reuses, --demo DIR) `twostage demo` without official weights, which trains
demo-xray-x4 on its training phantoms and its palm model on that network's crops. Then, as a
user would: prepare-sr of the same training images with bicubic, train --stage demo-palm with
the same seed and steps, calibrate with the same global model on the same validation fold,
evaluate the same held-out set. Prints carpal Dice per class of both palm models (fused,
calibrated) and PSNR/SSIM of the network against bicubic on the held-out set's palm regions,
which neither the network nor the palm models saw.

    .venv/bin/python benchmarks/srseg.py                  # demo + one palm model, ~10 min on 2 cores
    .venv/bin/python benchmarks/srseg.py --demo twostage-demo --seeds 0,1,2   # reuse a demo; 5 more palm models
    .venv/bin/python benchmarks/srseg.py --demo twostage-demo --work /tmp/srseg-320 \
        --palm-set model.input_size=320                   # palm models that see the box at 2.4x native
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustness import Runner, StepFailed, remove, summarize


def heldout_quality(heldout: Path, name: str, weights_dir: Path) -> dict:
    """PSNR/SSIM of the network and bicubic on every held-out image's palm region."""
    from twostage.sr.patches import palm_regions
    from twostage.sr.quality import holdout_pairs, quality
    from twostage.sr.train_config import load_sr_config
    from twostage.sr.upscale import make_upscaler

    cfg = load_sr_config("demo-sr", data=str(heldout))
    regions = [r for _, r in palm_regions(heldout, cfg.data.margin, cfg.data.context)]
    ups = {"network": make_upscaler(name, weights_dir=weights_dir), "bicubic": make_upscaler("bicubic", scale=4)}
    return quality(ups, holdout_pairs(regions, cfg), cfg.net.scale) | {"regions": len(regions)}


def main(argv: list[str] | None = None) -> int:
    from twostage.classes import PALM_CLASSES
    from twostage.demo import DEMO_SR
    from twostage.sr.quality import quality_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/twostage-srseg"), help="work folder (default: %(default)s)")
    p.add_argument("--demo", type=Path, help="a finished `twostage demo` folder that trained its own SR network "
                                             "(default: run one in WORK/demo)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0],
                   help="palm training seeds, e.g. 0,1,2 (seed 0 on SR crops is the demo's own model; default 0)")
    p.add_argument("--palm-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for every palm model, e.g. model.input_size=320 (then the demo's own palm "
                        "model is not reused)")
    p.add_argument("--reuse", action="store_true", help="keep palm models already evaluated in WORK (same demo)")
    a = p.parse_args(argv)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    run = Runner(a.work / "logs", env)
    demo = a.demo or a.work / "demo"
    try:
        if a.demo is None:
            remove(demo)
            run("demo", ["demo", "--out", str(demo), "--device", a.device])
        wd = demo / "weights"
        if not (wd / f"{DEMO_SR}.pth").is_file():
            raise StepFailed(f"{demo}: no {DEMO_SR}.pth (the demo used official weights or bicubic)")
        data, heldout, g = demo / "data", demo / "heldout", demo / "runs" / "global" / "best.pt"
        palm_cfg = json.loads((demo / "palm-data" / "palmset.json").read_text())
        bic_data = a.work / "palm-bicubic"
        if not a.reuse:
            remove(bic_data)
        run("prepare-sr bicubic", ["prepare-sr", str(data), "--out", str(bic_data), "--upscaler", "bicubic",
                                   "--scale", str(palm_cfg["scale"]), "--margin", str(palm_cfg["margin"]),
                                   "--context", str(palm_cfg["context"]), "--stage", "demo-palm"])
        evals: dict[str, list[Path]] = {"SR": [], "bicubic": []}
        for seed in a.seeds:
            for kind, palm_data in (("SR", demo / "palm-data"), ("bicubic", bic_data)):
                if kind == "SR" and seed == 0 and not a.palm_set:  # the demo's own palm model and its evaluation
                    evals[kind].append(demo / "evaluation" / "evaluation.json")
                    continue
                palm_run = a.work / "runs" / f"palm-{kind}-{seed}"
                ev_dir = a.work / f"evaluation-{kind}-{seed}"
                evals[kind].append(ev_dir / "evaluation.json")
                if a.reuse and (ev_dir / "evaluation.json").is_file():
                    run.skip(f"palm {kind} {seed}", f"--reuse: {ev_dir} is there")
                    continue
                for d in (palm_run, ev_dir):
                    remove(d)
                # the global run's folds, whatever the seed: the validation IDs calibrate uses stay unseen
                run(f"train palm {kind} {seed}", ["train", "--stage", "demo-palm", "--data", str(palm_data), "--out",
                                                 str(palm_run), "--device", a.device, "--set", f"train.seed={seed}",
                                                 "--set", f"data.split_file={demo / 'runs' / 'global' / 'split.json'}",
                                                 *(x for kv in a.palm_set for x in ("--set", kv))])
                wd_args = ["--weights-dir", str(wd)] if kind == "SR" else []
                run(f"calibrate {kind} {seed}", ["calibrate", str(data), "--global", str(g), "--palm",
                                                 str(palm_run / "best.pt"), "--thresholds-grid", "0.5",
                                                 "--device", a.device, *wd_args])
                run(f"evaluate {kind} {seed}", ["evaluate", str(heldout), "--global", str(g), "--palm",
                                                str(palm_run / "best.pt"), "--out", str(ev_dir), "--pictures", "0",
                                                "--device", a.device, *wd_args])
    except StepFailed as e:
        print(f"srseg benchmark failed: {e}", file=sys.stderr)
        return 1
    scores = {k: [summarize(json.loads(f.read_text())) for f in files] for k, files in evals.items()}
    q = heldout_quality(heldout, DEMO_SR, wd)
    print(f"\n{DEMO_SR} vs bicubic on the {q.pop('regions')} held-out palm regions (PSNR / SSIM):\n" + quality_table(q))
    key = scores["SR"][0]["judged_on"]

    def mean(kind: str, get) -> float:
        return sum(get(s[key]) for s in scores[kind]) / len(scores[kind])

    g0 = scores["SR"][0]["global"]
    print(f"\nheld-out carpal Dice ({key} fusion, one global model; palm models on SR or bicubic crops, "
          f"mean of seeds {', '.join(map(str, a.seeds))}):")
    print(f"{'':<14}{'global':>8}{'SR':>8}{'bicubic':>9}{'SR - bic':>10}")
    rows = [(c, g0["per_class"][c], lambda r, c=c: r["per_class"][c]) for c in PALM_CLASSES]
    rows += [("carpal mean", g0["carpal_mean"], lambda r: r["carpal_mean"]),
             ("overall", g0["overall"], lambda r: r["overall"])]
    for label, g_value, get in rows:
        s, b = mean("SR", get), mean("bicubic", get)
        print(f"{label:<14}{g_value:>8.4f}{s:>8.4f}{b:>9.4f}{s - b:>+10.4f}")
    if len(a.seeds) > 1:
        per_seed = [sr[key]["carpal_mean"] - bic[key]["carpal_mean"] for sr, bic in zip(scores["SR"], scores["bicubic"])]
        print("carpal mean SR - bicubic per seed: " + ", ".join(f"{d:+.4f}" for d in per_seed))
    out = a.work / "srseg.json"
    out.write_text(json.dumps({"quality": q, "seeds": a.seeds, "scores": scores, "times": run.times}, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
