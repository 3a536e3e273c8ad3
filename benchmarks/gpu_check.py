"""The GPU check: what only a CUDA machine can show, as one bounded command (never a CI requirement).

Every step runs in its own process group with a timeout (the smaller of its cap and the
budget left), so a step that fails or hangs is a FAIL row and the whole run ends within
--budget-s (default 480 s: a short GPU loan). Steps, in order (`STEPS`: seconds on one H200):
  1. the CUDA-only tests (`pytest -k cuda`); synth: --n + --test-n phantoms at --size (2048²);
  2. `infer --fuse` on the CPU, the GPU and the GPU with --fp16, on confident models of the
     real stage architectures, each GPU run compared with the CPU run on probabilities,
     confident mask flips and palm boxes (benchmarks/device_compare.py says why and the targets);
  3. prepare-sr with an RRDBNet x4 (official architecture, random weights), tiled, fp16 on
     the GPU; 20 steps of `train-sr --stage sr`;
  4. benchmarks/gpu_train.py: both real stages (AMP, channels-last) on 2048² phantoms, and
     whether the GPU or the loader sets the pace;
  5. optional, only while the budget leaves time (else a smaller variant, else SKIP):
     benchmarks/infer.py (old vs new chain; fused images/s against its floor) and benchmarks/sr.py.
Then one table (check, PASS/FAIL/SKIP, seconds, figure, target); --json writes it.
--inject-bug (shift, swap, nofuse) makes the device infer runs wrong on purpose: the
comparison rows must then FAIL, on a CPU as on a GPU.

    .venv/bin/python benchmarks/gpu_check.py --json gpu-check.json      # on a CUDA machine, < 8 min
    .venv/bin/python benchmarks/gpu_check.py --device cpu --size 512 --n 6 --test-n 1 --skip-tests \\
        --skip-benchmarks --set model.input_size=128 --set model.arch=Unet \\
        --set model.encoder=resnet18                                     # the script itself, on a CPU
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_compare import BUGS, TARGET
from rehearsal_2048 import work_folders

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# step: (seconds expected on one H200, cap in seconds). Expected figures come from H200 runs
# (CUDA tests 50 s; gpu_train --n 64 --epochs 4 150-250 s, scaled to --n 16 --epochs 2) or are
# estimates; a cap is the step's timeout when the budget leaves that much.
STEPS = {
    "tests": (55, 150), "synth": (10, 90), "prepare-sr": (25, 150), "train-sr": (35, 150),
    "train": (90, 240), "models": (25, 120), "infer-cpu": (60, 240), "infer-device": (20, 120),
    "compare": (15, 90), "bench-sr": (60, 120), "bench-sr-small": (20, 60), "bench-infer": (100, 200),
    "bench-infer-small": (60, 120),
}
RESERVE_S = 10      # kept back for the table and the JSON
OPTIONAL_MARGIN = 1.5  # an optional step starts only with this multiple of its expected time left
COMPARE_TILE = 192  # upscaler tile of the compared infer runs: the ~300 px palm crop is tiled


class Check:
    """Runs the steps within one budget and keeps the table rows."""

    def __init__(self, budget_s: float, env: dict, t0: float | None = None):
        self.t0, self.budget, self.env = time.perf_counter() if t0 is None else t0, budget_s, env
        self.rows: list[dict] = []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0) - RESERVE_S

    def row(self, name: str, ok: bool | None, figure: str, target: str, seconds: float = 0.0, **extra) -> dict:
        r = {"name": name, "status": "SKIP" if ok is None else "PASS" if ok else "FAIL", "pass": ok,
             "figure": figure, "target": target, "seconds": round(seconds, 1), **extra}
        self.rows.append(r)
        print(f"[gpu_check] {r['status']} {name}: {figure} (target: {target})", flush=True)
        return r

    def step(self, name: str, key: str, cmd: list[str], *, target: str = "exit 0",
             judge: Callable[[int, str, float], dict] | None = None, skip: str | None = None,
             blocked: str | None = None, optional: bool = False) -> bool:
        """Run one step; True when its row passed. `skip`: left out on purpose (SKIP);
        `blocked`: could not run because an earlier step failed (FAIL)."""
        est, cap = STEPS[key]
        if skip:
            self.row(name, None, f"skipped ({skip})", target)
            return False
        if blocked:
            return self.row(name, False, f"not run: {blocked}", target)["pass"]
        left = self.left()
        if optional and left < OPTIONAL_MARGIN * est:
            self.row(name, None, f"skipped: {left:.0f} s of budget left, needs ~{est} s", target)
            return False
        if left < 5:
            return self.row(name, False, f"not run: the budget is spent ({left:.0f} s left)", target)["pass"]
        timeout = min(cap, left)
        rc, secs, out = run_bounded(cmd, timeout, self.env)
        if rc is None and optional and timeout < cap:
            self.row(name, None, f"stopped after {secs:.0f} s: the budget ran out", target, secs)
            return False
        if rc is None:
            return self.row(name, False, f"timed out after {secs:.0f} s (cap {cap} s, budget left {left:.0f} s)",
                            target, secs)["pass"]
        verdict = (judge or exit_zero)(rc, out, secs)
        return self.row(name, verdict.pop("pass"), verdict.pop("figure"), verdict.pop("target", target), secs,
                        **verdict)["pass"]


def run_bounded(cmd: list[str], timeout: float, env: dict) -> tuple[int | None, float, str]:
    """Run `cmd` in its own process group, echoing its output; after `timeout` seconds the whole
    group (DataLoader workers too) is killed. Returns (exit code or None, seconds, output tail)."""
    print(f"\n$ {' '.join(str(c) for c in cmd)}   (timeout {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=400)

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rc = None
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    reader.join(5)
    sys.stdout.flush()
    return rc, time.perf_counter() - t0, "".join(tail)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def exit_zero(rc: int, out: str, secs: float) -> dict:
    if rc == 0:
        return {"pass": True, "figure": f"exit 0 in {secs:.0f} s"}
    last = [ln.strip() for ln in out.splitlines() if ln.strip()][-1:] or [""]
    return {"pass": False, "figure": f"exit {rc}: {last[0][:200]}"}


def pytest_judge(cuda: bool) -> Callable[[int, str, float], dict]:
    """rc 0 and, on CUDA, at least one test that ran (all skipped means CUDA was not seen)."""
    def judge(rc: int, out: str, secs: float) -> dict:
        lines = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|deselected|error).*?)(?: in [\d.]+s.*)?=*$",
                           out, re.M)
        summary = lines[-1].strip() if lines else f"exit {rc}"
        passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
        return {"pass": rc == 0 and (passed > 0 or not cuda), "figure": summary}

    return judge


def json_judge(path: Path, fn: Callable[[dict], dict], ok_codes=(0,)) -> Callable[[int, str, float], dict]:
    """Judge a step by the JSON it wrote (exit codes in `ok_codes` are left to `fn`)."""
    def judge(rc: int, out: str, secs: float) -> dict:
        if rc not in ok_codes or not path.is_file():
            return exit_zero(rc if rc else 1, out + f"\nno {path.name}", secs)
        return fn(json.loads(path.read_text()))

    return judge


def train_figures(cuda: bool) -> Callable[[dict], dict]:
    from gpu_train import EPOCH_TARGET, UTIL_TARGET

    def fn(doc: dict) -> dict:
        ok, parts = True, []
        for r in doc["rows"]:
            util_ok = r["util"] is None or r["util"] >= UTIL_TARGET
            ok &= (r["epoch_vs_compute"] <= EPOCH_TARGET and util_ok) or not cuda
            util = "-" if r["util"] is None else f"{r['util']:.0f} %"
            parts.append(f"{r['stage']}: {r['compute_ms']:.0f} ms/step, epoch/compute {r['epoch_vs_compute']:.2f}, "
                         f"GPU util {util}, peak {r['peak_gib'] if r['peak_gib'] is not None else '-'} GiB")
        return {"pass": bool(ok) and len(doc["rows"]) == 2, "figure": "; ".join(parts), "stages": doc["rows"],
                "target": f"both stages train; epoch <= {EPOCH_TARGET}x compute, GPU util >= {UTIL_TARGET:.0f} %"
                          + ("" if cuda else " (pace targets on CUDA only)")}

    return fn


def infer_figures(cuda: bool) -> Callable[[dict], dict]:
    """benchmarks/infer.py's old-vs-new figures; on CUDA the new chain must reach its floor."""
    def fn(doc: dict) -> dict:
        old, new = doc["old"], doc["new"]
        target = doc["target_images_per_s"]
        ok = not cuda or new["images_per_s"] >= target
        return {"pass": ok, "figure": f"{new['images_per_s']:.1f} img/s fused (old {old['images_per_s']:.1f}), "
                                      f"outside the networks {new['rest_share']:.0%} (old {old['rest_share']:.0%}), "
                                      f"set-up {new['setup_s']:.1f} s (old {old['setup_s']:.1f}); "
                                      f"CSVs identical: {doc['csv_identical']}",
                "target": f">= {target} img/s fused at 2048²" + ("" if cuda else " (on CUDA only)")}

    return fn


def leg_figures(doc: dict) -> dict:
    peak = "" if doc.get("peak_gpu_gib") is None else f", peak GPU {doc['peak_gpu_gib']:.2f} GiB"
    mode = "fused" if doc["fused"] else "global only"
    return {"pass": True, "figure": f"{doc['images']} image(s) {mode} in {doc['wall_s']:.1f} s{peak}",
            "peak_gpu_gib": doc.get("peak_gpu_gib")}


def print_table(rows: list[dict]) -> None:
    w = max(len(r["name"]) for r in rows) + 2
    print(f"\n{'check':<{w}}{'result':<8}{'s':>6}  figure  [target]")
    for r in rows:
        print(f"{r['name']:<{w}}{r['status']:<8}{r['seconds']:>6.0f}  {r['figure']}  [{r['target']}]")


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=2048, help="phantom side (default 2048)")
    p.add_argument("--n", type=int, default=8, help="training phantoms for prepare-sr and train-sr (default 8)")
    p.add_argument("--test-n", type=int, default=2, help="phantoms inferred and compared (default 2)")
    p.add_argument("--train-n", type=int, default=16, help="gpu_train.py --n (default 16: 4 steps per epoch)")
    p.add_argument("--train-epochs", type=int, default=2, help="gpu_train.py --epochs (the first is not timed)")
    p.add_argument("--tile", type=int, default=512, help="Real-ESRGAN tile of prepare-sr (default 512)")
    p.add_argument("--set", "--train-set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help="stage config override for the training and the compared models (e.g. a smaller "
                        "model.input_size on a CPU)")
    p.add_argument("--budget-s", type=float, default=480, help="wall-clock budget (default 480): every timeout "
                   "fits in it; the optional benchmarks run only if it leaves time")
    p.add_argument("--inject-bug", choices=BUGS, help="make the device infer runs wrong: the comparison must FAIL")
    p.add_argument("--json", type=Path, help="write the table here")
    p.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    for what, text in (("tests", "the CUDA-only tests"), ("sr", "prepare-sr and train-sr"),
                       ("train", "benchmarks/gpu_train.py"),
                       ("benchmarks", "benchmarks/sr.py and benchmarks/infer.py")):
        p.add_argument(f"--skip-{what}", action="store_true", help=f"leave out {text}")
    a = p.parse_args(argv)

    import torch

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available here (use --device cpu to try the script itself)")
    name = torch.cuda.get_device_name(a.device) if cuda else "cpu"
    print(f"torch {torch.__version__}, device {a.device} ({name}), budget {a.budget_s:.0f} s"
          + (f", injected bug: {a.inject_bug}" if a.inject_bug else ""), flush=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    chk = Check(a.budget_s, env, t0)
    py, tw = sys.executable, [sys.executable, "-m", "twostage"]
    sets = [x for kv in a.set for x in ("--set", kv)]

    chk.step("CUDA-only tests (pytest -k cuda)", "tests",
             [py, "-m", "pytest", "-q", "-rs", "-k", "cuda", "-p", "no:cacheprovider", ROOT / "tests"],
             target="exit 0" + (", at least one test ran" if cuda else ""), judge=pytest_judge(cuda),
             skip="--skip-tests" if a.skip_tests else None)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        data, palm, wdir, runs = work_folders(a.keep or Path(tmp))
        test_dir, cmp = data / "test" / "DCM", runs / "compare"
        have_data = chk.step(f"synth ({a.n}+{a.test_n} phantoms of {a.size}²)", "synth",
                             [*tw, "synth", "--out", data, "--n", a.n, "--test-n", a.test_n, "--size", a.size,
                              "--overwrite"])
        no_data = None if have_data else "synth failed"
        # first the comparison (the check a wrong GPU path fails), then training
        models = cmp / "models"
        have_models = chk.step("confident models (stage configs)", "models",
                               [py, BENCH / "device_compare.py", "models", "--images", test_dir, "--out", models,
                                "--device", a.device, "--weights-dir", wdir, "--tile", COMPARE_TILE, *sets,
                                *(["--bug", a.inject_bug] if a.inject_bug else [])],
                               blocked=no_data)
        info = json.loads((models / "models.json").read_text()) if have_models else {}
        legs = [("cpu", "cpu", False, False)]
        legs += [(a.device, a.device, False, True), (f"{a.device} fp16", a.device, True, True)] if cuda else \
            [("cpu again", "cpu", False, True)]
        done = {}
        for label, device, fp16, is_dev in legs:
            leg = cmp / label.replace(" ", "-").replace(":", "")
            images, glob = (info.get("device_images"), info.get("device_global")) if is_dev else \
                (info.get("images"), info.get("global"))
            fuse = info.get("device_fuse", True) if is_dev else True
            cmd = [py, BENCH / "device_compare.py", "leg", "--images", images, "--global", glob,
                   *(["--palm", info.get("palm")] if fuse else []), "--device", device, *(["--fp16"] if fp16 else []),
                   "--tile", COMPARE_TILE, "--weights-dir", wdir, "--out", leg]
            done[label] = leg if chk.step(f"infer --fuse on {label}", "infer-cpu" if device == "cpu" else
                                          "infer-device", cmd, judge=json_judge(leg / "summary.json", leg_figures),
                                          blocked=None if have_models else "no models") else None
        ref = done.pop("cpu")
        for label, leg in done.items():
            out = cmp / f"{leg.name if leg else label}-vs-cpu.json"
            chk.step(f"{label} vs cpu: probabilities, masks, boxes", "compare",
                     [py, BENCH / "device_compare.py", "compare", ref, leg, "--json", out],
                     judge=json_judge(out, dict),
                     blocked=None if ref and leg else "an infer run failed", target=TARGET)

        sr = "--skip-sr" if a.skip_sr else None
        chk.step("prepare-sr (RRDBNet x4" + (", fp16)" if cuda else ")"), "prepare-sr",
                 [*tw, "prepare-sr", data, "--out", palm, "--upscaler", "RealESRGAN_x4plus", "--tile", a.tile,
                  "--device", a.device, "--weights-dir", wdir, "--overwrite"], skip=sr, blocked=no_data)
        chk.step("train-sr (20 steps)", "train-sr",
                 [*tw, "train-sr", data, "--out", "gpu-check-x4", "--stage", "sr", "--steps", "20", "--device",
                  a.device, "--weights-dir", wdir, "--run", runs / "sr", "--set", "data.holdout=1",
                  "--set", "train.val_every=20", "--overwrite"], skip=sr, blocked=no_data)
        train_json = runs / "gpu_train.json"
        chk.step("train global + palm" + (" (AMP, channels-last; gpu_train.py)" if cuda else " (gpu_train.py)"),
                 "train", [py, BENCH / "gpu_train.py", "--device", a.device, "--size", a.size, "--n", a.train_n,
                           "--epochs", a.train_epochs, "--compute-steps", "10", "--json", train_json, *sets],
                 judge=json_judge(train_json, train_figures(cuda), ok_codes=(0, 1)),
                 skip="--skip-train" if a.skip_train else None)

        bench = "--skip-benchmarks" if a.skip_benchmarks else None
        for key, title, full, small in (
                ("bench-infer", "benchmarks/infer.py",
                 ["--size", a.size, "--images", "8", "--upscaler", "RealESRGAN_x4plus", "--box-side", "0.25,0.35",
                  *(["--fp16"] if cuda else []), *sets],
                 ["--size", a.size, "--images", "4", "--upscaler", "realesr-general-x4v3", "--box-side", "0.25,0.35",
                  *(["--fp16"] if cuda else []), *sets]),
                ("bench-sr", "benchmarks/sr.py", ["--size", "512", "--tiles", "0,256,512"],
                 ["--size", "512", "--tiles", "512", "--upscalers", "bicubic,RealESRGAN_x4plus", "--repeats", "1"])):
            use_small = chk.left() < OPTIONAL_MARGIN * STEPS[key][0]
            k, extra = (f"{key}-small", small) if use_small else (key, full)
            out = runs / f"{key}.json"
            judge = json_judge(out, infer_figures(cuda)) if key == "bench-infer" else None
            chk.step(title + (" (smaller)" if use_small else ""), k,
                     [py, BENCH / title.split("/")[1], "--device", a.device, *extra,
                      *(["--json", out] if judge else [])], skip=bench, optional=True, judge=judge)

    total = time.perf_counter() - chk.t0
    print_table(chk.rows)
    failed = [r["name"] for r in chk.rows if r["pass"] is False]
    print(f"\ngpu_check: {len(chk.rows)} checks in {total:.0f} s (budget {a.budget_s:.0f} s): "
          + ("all passed" if not failed else f"FAILED: {'; '.join(failed)}"), flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "budget_s": a.budget_s,
                                      "seconds": round(total, 1), "inject_bug": a.inject_bug,
                                      "passed": not failed, "rows": chk.rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
