"""Robustness sweep (issue 15): does the palm stage pay off on phantoms it was not tuned on?

For each phantom variant (`twostage.data.synth.VARIANTS`: carpal size and packing, contrast and
noise, hand pose and scale; image size with NAME@SIZE), the product runs exactly as
`twostage demo` runs it, every step a `python -m twostage ...` subprocess:

    synth DATA (n=32, --size, seed S)          synth HELDOUT (n=16, seed S+1000)
    prepare-sr DATA (bicubic x4)               train --stage demo-global, then demo-palm
    calibrate DATA (only if the installed calibrate has a validation-fold mode; fusion weights
                    only, as the demo calibrates; --calibrate-thresholds also chooses thresholds)
    evaluate HELDOUT --pictures 0              -> evaluation.json

and reads the held-out scores: global vs fused (and calibrated, when evaluate reports it)
carpal mean, overall, carpal gain and the worst per-class carpal change. A table per
variant, then the variants side by side (gains, worst carpal, and the issue's target:
carpal gain >= +0.05 and no carpal below global by more than 0.005, judged on calibrated
fusion where there is one), then the per-class carpal changes per variant. All numbers go
to --json. Elapsed time is printed per step and per variant; each step's output goes to
WORK/VARIANT/logs/.

    .venv/bin/python benchmarks/robustness.py                    # all variants, 512², ~10 min each on 2 cores
    .venv/bin/python benchmarks/robustness.py --quick --variants small-carpals   # smoke test, minutes
    .venv/bin/python benchmarks/robustness.py --variants default@384,pose --keep
    # a palm-stage alternative on the same data and global models:
    .venv/bin/python benchmarks/robustness.py --keep --reuse-global --tag ctx2 --palm-set box.jitter_shift=0.2

Folders: WORK/VARIANT/{data,heldout,palm-data} (made anew unless --keep finds them made with
the same arguments), WORK/VARIANT/runs/global (or runs/TAG/global with --global-set),
WORK/VARIANT/runs/TAG/{palm,evaluation}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from twostage.box import DEFAULT_MARGIN
from twostage.classes import PALM_CLASSES
from twostage.data.synth import VARIANTS

TARGET_GAIN = 0.05
"""Issue 15: fused carpal mean at least this far above the global model's, on every variant."""
TARGET_WORST = -0.005
"""Issue 15: no carpal class more than this below the global model after calibration."""
DEFAULT_TAG = "base"
MARKER = "robustness-args.json"


class StepFailed(RuntimeError):
    pass


def parse_variants(text: str | None, size: int) -> list[tuple[str, str, int]]:
    """'a,b@384' -> [(label, variant name, image size)]; default: 'default' then every other variant."""
    names = text.split(",") if text else ["default", *(v for v in VARIANTS if v != "default")]
    out = []
    for spec in (s.strip() for s in names if s.strip()):
        name, _, px = spec.partition("@")
        if name not in VARIANTS:
            raise SystemExit(f"robustness: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        if px and not px.isdigit():
            raise SystemExit(f"robustness: {spec!r}: the size after @ must be an integer")
        out.append((spec, name, int(px) if px else size))
    return out


class Runner:
    """Runs `python -m twostage ARGS` with its output in a log file; times every step."""

    def __init__(self, logs: Path, env: dict):
        self.logs, self.env, self.times, self.commands = logs, env, {}, {}
        logs.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: str, args: list[str]) -> float:
        log = self.logs / (re.sub(r"[^A-Za-z0-9_.-]+", "-", step) + ".log")
        shown = "twostage " + " ".join(args)
        print(f"  {step:<16} $ {shown}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "twostage", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=self.env).returncode
        dt = time.perf_counter() - t0
        self.times[step], self.commands[step] = dt, shown
        print(f"  {'':<16}   {dt:6.1f} s" + ("" if rc == 0 else f"  FAILED (exit {rc}), log {log}"), flush=True)
        if rc != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            print("\n".join("    | " + line for line in tail), flush=True)
            raise StepFailed(f"{step}: exit code {rc} (log {log})")
        return dt

    def skip(self, step: str, why: str) -> None:
        print(f"  {step:<16}   skipped: {why}", flush=True)
        self.times[step] = 0.0


def twostage_help(command: str, env: dict) -> str:
    r = subprocess.run([sys.executable, "-m", "twostage", command, "--help"], capture_output=True, text=True, env=env)
    return r.stdout if r.returncode == 0 else ""


def calibrate_mode(help_text: str) -> tuple[list[str] | None, bool, str]:
    """How to run the installed calibrate on the validation fold of the training data:
    (extra flags or None if it has no validation-fold mode, whether --out is required, note)."""
    if not help_text:
        return None, False, "no `twostage calibrate` here"
    usage = help_text.split("\n\n", 1)[0]
    out_required = re.search(r"(?<!\[)--out DIR", usage) is not None
    if "--holdout" in help_text:
        return ["--holdout"], out_required, "calibrate --holdout (validation fold)"
    if "--all-images" in help_text:  # holdout by default, --all-images opts out
        return [], out_required, "calibrate (validation fold by default)"
    return None, out_required, ("the installed calibrate has no validation-fold mode (it would calibrate on "
                                "images the models trained on)")


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(ev: dict) -> dict:
    """Carpal mean, overall, gains and per-class carpal changes of every fusion vs global."""
    g = ev["global"]
    out = {"global": {"carpal_mean": g["carpal_mean"], "overall": g["overall"],
                      "per_class": {c: g["per_class"][c] for c in PALM_CLASSES}}}
    for key in ("fused", "calibrated"):
        r = ev.get(key)
        if not r:
            out[key] = None
            continue
        change = {c: r["per_class"][c] - g["per_class"][c] for c in PALM_CLASSES}
        worst = min(change, key=change.get)
        out[key] = {"carpal_mean": r["carpal_mean"], "overall": r["overall"],
                    "carpal_gain": r["carpal_mean"] - g["carpal_mean"], "overall_gain": r["overall"] - g["overall"],
                    "worst_class": worst, "worst_change": change[worst], "carpal_change": change,
                    "per_class": {c: r["per_class"][c] for c in PALM_CLASSES}}
    judged = out["calibrated"] or out["fused"]
    out["judged_on"] = "calibrated" if out["calibrated"] else "fused"
    out["meets_target"] = bool(judged["carpal_gain"] >= TARGET_GAIN and judged["worst_change"] >= TARGET_WORST)
    return out


def variant_table(label: str, s: dict) -> str:
    lines = [f"{'':<12}{'carpal':>8}{'overall':>9}{'carpal gain':>13}{'overall gain':>14}   worst carpal change",
             f"{'global':<12}{s['global']['carpal_mean']:>8.4f}{s['global']['overall']:>9.4f}"]
    for key in ("fused", "calibrated"):
        r = s[key]
        if r is None:
            lines.append(f"{key:<12}{'(not in evaluation.json)':>30}")
            continue
        lines.append(f"{key:<12}{r['carpal_mean']:>8.4f}{r['overall']:>9.4f}{r['carpal_gain']:>+13.4f}"
                     f"{r['overall_gain']:>+14.4f}   {r['worst_class']} {r['worst_change']:+.4f}")
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    head = (f"{'variant':<22}{'global':>8}{'fused':>8}{'gain':>8}{'worst (fused)':>24}"
            f"{'calib.':>8}{'gain':>8}{'worst (calibrated)':>24}   target")
    lines = [head]
    for label, r in results.items():
        s = r.get("scores")
        if s is None:
            lines.append(f"{label:<22}  failed: {r.get('error')}")
            continue
        f, c = s["fused"], s["calibrated"]
        row = f"{label:<22}{s['global']['carpal_mean']:>8.4f}{f['carpal_mean']:>8.4f}{f['carpal_gain']:>+8.4f}" \
              f"{f['worst_class'] + ' ' + format(f['worst_change'], '+.4f'):>24}"
        row += (f"{c['carpal_mean']:>8.4f}{c['carpal_gain']:>+8.4f}"
                f"{c['worst_class'] + ' ' + format(c['worst_change'], '+.4f'):>24}") if c else \
            f"{'-':>8}{'-':>8}{'-':>24}"
        row += f"   {'yes' if s['meets_target'] else 'NO'} ({s['judged_on']})"
        lines.append(row)
    return "\n".join(lines)


def per_class_table(results: dict) -> str:
    done = [(label, r["scores"]) for label, r in results.items() if r.get("scores")]
    cols = [(label, key) for label, s in done for key in ("fused", "calibrated") if s[key]]
    names = [f"{label} {'f' if key == 'fused' else 'c'}" for label, key in cols]
    width = max([10, *(len(n) + 2 for n in names)])
    lines = [f"{'change vs global':<18}" + "".join(f"{n:>{width}}" for n in names)]
    for c in PALM_CLASSES:
        lines.append(f"{c:<18}" + "".join(f"{dict(done)[label][key]['carpal_change'][c]:>+{width}.4f}"
                                          for label, key in cols))
    lines.append(f"{'carpal mean':<18}" + "".join(f"{dict(done)[label][key]['carpal_gain']:>+{width}.4f}"
                                                  for label, key in cols))
    return "\n".join(lines) + "\n(f: fused with the default weights, c: calibrated)"


def run_variant(a, label: str, name: str, size: int, work: Path, env: dict, calib: tuple) -> dict:
    """All steps for one variant; returns its record (scores, times, commands, folders)."""
    root = work / label
    data, heldout, palm_data = root / "data", root / "heldout", root / "palm-data"
    tagged = root / "runs" / a.tag
    g_run = (tagged if a.global_set else root / "runs") / "global"
    p_run, e_dir = tagged / "palm", tagged / "evaluation"
    run = Runner(root / "logs" / a.tag, env)
    record = {"variant": name, "style": asdict(VARIANTS[name]), "size": size, "seed": a.seed,
              "n_train": a.n_train, "n_heldout": a.n_heldout, "tag": a.tag, "global_set": a.global_set,
              "palm_set": a.palm_set, "upscaler": a.upscaler, "margin": a.margin,
              "calibrate_thresholds": a.calibrate_thresholds, "times": run.times, "commands": run.commands,
              "folders": {"data": str(data), "heldout": str(heldout), "palm_data": str(palm_data),
                          "global": str(g_run), "palm": str(p_run), "evaluation": str(e_dir)}}
    t0 = time.perf_counter()
    print(f"\n== {label}: variant {name} {VARIANTS[name].changes() or '(as always)'}, {size} px, seed {a.seed}, "
          f"{a.n_train} train / {a.n_heldout} held-out, tag {a.tag} ==", flush=True)
    data_args = {k: record[k] for k in ("variant", "style", "size", "seed", "n_train", "n_heldout")}
    data_args = json.loads(json.dumps({**data_args, "upscaler": a.upscaler}))  # as the marker reads back
    marker, palm_marker = root / MARKER, root / ("palm-data." + MARKER)
    palm_args = {"upscaler": a.upscaler, "margin": a.margin}
    kept = a.keep and read_marker(marker) == data_args and data.is_dir() and heldout.is_dir()
    if kept:
        run.skip("synth", f"--keep: {data} and {heldout} made with the same arguments")
    else:
        if a.keep and marker.exists():
            print(f"  (--keep: {root} was made with other arguments; making the data anew)")
        for d in (data, heldout):
            remove(d)
        marker.unlink(missing_ok=True)
        common = ["--size", str(size), "--variant", name]
        run("synth", ["synth", "--out", str(data), "--n", str(a.n_train), "--seed", str(a.seed), *common])
        run("synth heldout", ["synth", "--out", str(heldout), "--n", str(a.n_heldout), "--seed",
                              str(a.seed + 1000), *common])
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(data_args, indent=1))
    if kept and (palm_data / "palmset.json").is_file() and read_marker(palm_marker) == palm_args:
        run.skip("prepare-sr", f"--keep: {palm_data} made with the same arguments")
    else:
        remove(palm_data)
        run("prepare-sr", ["prepare-sr", str(data), "--out", str(palm_data), "--upscaler", a.upscaler,
                           "--margin", str(a.margin), "--stage", "demo-palm", "--device", a.device])
        palm_marker.write_text(json.dumps(palm_args, indent=1))

    base = ["--device", a.device, "--set", f"train.seed={a.seed}"] + \
        (["--set", f"train.epochs={a.epochs}"] if a.epochs else [])
    g_args = [*base, *(x for kv in a.global_set for x in ("--set", kv))]
    g_marker = {"data": data_args, "args": g_args}
    if a.reuse_global and kept and (g_run / "best.pt").is_file() and read_marker(g_run / MARKER) == g_marker:
        run.skip("train global", f"--reuse-global: {g_run}/best.pt")
    else:
        if a.reuse_global:
            print(f"  (--reuse-global: no global run of these data and arguments in {g_run}; training it)")
        remove(g_run)
        run("train global", ["train", "--stage", "demo-global", "--data", str(data), "--out", str(g_run), *g_args])
        (g_run / MARKER).write_text(json.dumps(g_marker, indent=1))
    remove(p_run)
    remove(e_dir)
    run("train palm", ["train", "--stage", "demo-palm", "--data", str(palm_data), "--out", str(p_run), *base,
                       *(x for kv in a.palm_set for x in ("--set", kv))])
    flags, out_required, note = calib
    record["calibration"] = note
    if flags is None:
        run.skip("calibrate", note)
    else:
        run("calibrate", ["calibrate", str(data), "--global", str(g_run / "best.pt"), "--palm", str(p_run / "best.pt"),
                          "--device", a.device, *flags,
                          *([] if a.calibrate_thresholds else ["--thresholds-grid", "0.5"]),
                          *(["--out", str(p_run / "calibration")] if out_required else [])])
    run("evaluate", ["evaluate", str(heldout), "--global", str(g_run / "best.pt"), "--palm", str(p_run / "best.pt"),
                     "--out", str(e_dir), "--pictures", "0", "--device", a.device])
    ev = json.loads((e_dir / "evaluation.json").read_text())
    record["scores"] = summarize(ev)
    record["calibration_used"] = ev.get("calibration")
    record["seconds"] = time.perf_counter() - t0
    print(f"\n{label} (held-out, {a.n_heldout} images; {record['seconds'] / 60:.1f} min: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in run.times.items()) + ")")
    print(variant_table(label, record["scores"]), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="variants: " + "; ".join(f"{k} {v.changes() or '(as always)'}"
                                                               for k, v in VARIANTS.items()))
    p.add_argument("--variants", help="comma-separated VARIANTS names, NAME@SIZE for another image size "
                                      "(default: default and every other variant)")
    p.add_argument("--work", type=Path, default=Path("/tmp/twostage-robustness"),
                   help="work folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training set and training; held-out: seed+1000")
    p.add_argument("--size", type=int, default=512, help="image side (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="12 train / 6 held-out images, 8 epochs per stage: a smoke test")
    p.add_argument("--n", type=int, dest="n_train", help="training images (default 32, --quick 12)")
    p.add_argument("--n-heldout", type=int, help="held-out images (default 16, --quick 6)")
    p.add_argument("--epochs", type=int, help="train.epochs of both stages (default: the demo configs', --quick 8)")
    p.add_argument("--keep", action="store_true",
                   help="reuse synth and prepare-sr outputs made with the same arguments")
    p.add_argument("--reuse-global", action="store_true",
                   help="with --keep: reuse the variant's trained global model if it was trained on these data "
                        "with these arguments")
    p.add_argument("--tag", default=DEFAULT_TAG, help="name of this palm configuration: runs/TAG/{palm,evaluation} "
                                                      "(default: %(default)s)")
    p.add_argument("--palm-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for palm training (repeatable)")
    p.add_argument("--global-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for global training (repeatable; the global run then lives in runs/TAG/global)")
    p.add_argument("--calibrate-thresholds", action="store_true",
                   help="calibrate thresholds too (calibrate's default); without it, fusion weights only, as the demo")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="prepare-sr --margin of the palm boxes (default: %(default)s, prepare-sr's)")
    p.add_argument("--upscaler", default="bicubic", help="prepare-sr upscaler (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device of every step (default: %(default)s)")
    p.add_argument("--json", type=Path, help="results (default: WORK/robustness.json, WORK/robustness-TAG.json "
                                             "with --tag)")
    a = p.parse_args(argv)
    a.n_train = a.n_train or (12 if a.quick else 32)
    a.n_heldout = a.n_heldout or (6 if a.quick else 16)
    a.epochs = a.epochs or (8 if a.quick else 0)
    if a.reuse_global and not a.keep:
        p.error("--reuse-global needs --keep (a global model is only reused on the data it was trained on)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", a.tag):
        p.error(f"--tag {a.tag!r}: letters, digits, '_', '.', '-' only")
    variants = parse_variants(a.variants, a.size)
    a.json = a.json or a.work / ("robustness.json" if a.tag == DEFAULT_TAG else f"robustness-{a.tag}.json")

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    calib = calibrate_mode(twostage_help("calibrate", env))
    print(f"robustness sweep: {', '.join(v[0] for v in variants)}; work {a.work}; calibration: {calib[2]}")
    results: dict = {}
    summary = {"argv": sys.argv[1:] if argv is None else argv, "target": {"carpal_gain": TARGET_GAIN,
               "worst_change": TARGET_WORST}, "calibration": calib[2], "variants": results}
    t0 = time.perf_counter()
    for label, name, size in variants:
        try:
            results[label] = run_variant(a, label, name, size, a.work, env, calib)
        except StepFailed as e:
            results[label] = {"variant": name, "size": size, "error": str(e)}
        summary["seconds"] = time.perf_counter() - t0
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(summary, indent=1))  # after every variant: a long sweep keeps what it has
    print(f"\nheld-out carpal mean Dice per variant (target: gain >= {TARGET_GAIN:+.3f} and worst carpal "
          f">= {TARGET_WORST:+.3f}; tag {a.tag}):")
    print(summary_table(results))
    if any(r.get("scores") for r in results.values()):
        print("\n" + per_class_table(results))
    print(f"\ntotal {summary['seconds'] / 60:.1f} min; "
          + ", ".join(f"{k} {r['seconds'] / 60:.1f} min" for k, r in results.items() if "seconds" in r))
    print(f"numbers: {a.json}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
