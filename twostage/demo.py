"""`twostage demo`: the whole product on synthetic data, in minutes, on a laptop CPU.

synth (train + a held-out set with another seed) → train-sr (an X-ray super-resolution network
trained on the demo's own training images, when the official Real-ESRGAN weights are not
there) → prepare-sr → train global → train palm →
calibrate (per-class fusion weights and thresholds on the validation fold, which neither model
trained on) → evaluate (the held-out set global-only, fused with the default weights and with
the calibrated ones; pictures).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import TwostageError

log = logging.getLogger(__name__)

DEMO_PARTS = ("data", "heldout", "weights", "palm-data", "runs", "evaluation")
"""The sub-folders a demo run writes (and `--overwrite` replaces)."""

REAL_ESRGAN = "RealESRGAN_x4plus"
"""The upscaler the demo uses when its weights are present under weights/."""

DEMO_SR = "demo-xray-x4"
"""The network the demo trains (into OUT/weights) when the official weights are not there."""


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run; `quick` trades accuracy for a ≤3 minute run."""

    n_train: int
    n_test: int
    global_epochs: int
    palm_epochs: int
    sr_steps: int

    @classmethod
    def for_mode(cls, quick: bool) -> "DemoPlan":
        return cls(n_train=16, n_test=6, global_epochs=30, palm_epochs=25, sr_steps=60) if quick else \
            cls(n_train=32, n_test=16, global_epochs=0, palm_epochs=0, sr_steps=0)  # 0: the demo config's own


def choose_upscaler(upscaler: str = "auto", weights_dir: str | os.PathLike | None = None) -> tuple[str | None, str]:
    """(name, reason): `auto` is Real-ESRGAN if its weights are usable here, else None (train
    one); any other name is used as given."""
    from .sr.upscale import make_upscaler

    if upscaler != "auto":
        make_upscaler(upscaler, weights_dir=weights_dir)  # fail now, not after training
        return upscaler, f"using {upscaler} (--upscaler)"
    try:
        make_upscaler(REAL_ESRGAN, weights_dir=weights_dir)
    except TwostageError as e:
        return None, (f"Real-ESRGAN weights not usable ({e}); training {DEMO_SR}, an X-ray super-resolution "
                      "network, on the demo's training images (stages/demo-sr.yaml)")
    return REAL_ESRGAN, f"using {REAL_ESRGAN} (weights found)"


def run_demo(out: str | os.PathLike = "twostage-demo", size: int = 512, quick: bool = False,
             seed: int = 0, device: str = "cpu", weights_dir: str | os.PathLike | None = None,
             overwrite: bool = False, upscaler: str = "auto") -> dict:
    """Run every step of the product on phantoms and return what was written and measured.

    An OUT folder that already holds files is an error unless `overwrite`, which replaces the
    demo's own sub-folders (DEMO_PARTS) and nothing else. `upscaler`: "auto" (the official
    RealESRGAN_x4plus when its weights are usable, else a network trained here into
    OUT/weights), "bicubic", or any upscaler name.
    """
    from .data.synth import synthesize
    from .evaluation.calibrate import calibrate
    from .evaluation.evaluate import evaluate
    from .fusion import DEFAULT_THRESHOLD
    from .sr.prepare import prepare_sr
    from .sr.train_config import load_sr_config
    from .sr.training import train_sr
    from .train import train_stage

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TwostageError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TwostageError(f"{out}: already holds files (an earlier demo?); pass --overwrite to replace "
                                "the demo's outputs there, or choose another --out")
        for name in DEMO_PARTS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    plan = DemoPlan.for_mode(quick)
    times: dict[str, float] = {}
    name, reason = choose_upscaler(upscaler, weights_dir)  # a bad --upscaler fails before any work

    def step(name: str):
        times[name] = time.perf_counter()
        log.info("== %s ==", name)

    def done(name: str):
        times[name] = time.perf_counter() - times[name]
        log.info("   %s: %.0f s", name, times[name])

    step("synth")
    data = synthesize(out / "data", n=plan.n_train, size=size, seed=seed)
    heldout = synthesize(out / "heldout", n=plan.n_test, size=size, seed=seed + 1000)
    done("synth")

    log.info("upscaler: %s", reason)
    sr = None
    if name is None:
        step("train-sr")
        weights_dir, name = out / "weights", DEMO_SR
        overrides = [f"train.device={device}", f"train.seed={seed}", f"train.out={out / 'runs' / 'sr'}"]
        if plan.sr_steps:
            overrides.append(f"train.steps={plan.sr_steps}")
        sr = train_sr(name, load_sr_config("demo-sr", overrides=overrides, data=str(data)), weights_dir=weights_dir,
                      overwrite=True)
        done("train-sr")

    step("prepare-sr")
    palm_data = out / "palm-data"
    prepare_sr(data, palm_data, upscaler=name, device=device, weights_dir=weights_dir)
    done("prepare-sr")

    runs = {}
    for stage, root, epochs in (("global", data, plan.global_epochs), ("palm", palm_data, plan.palm_epochs)):
        step(f"train {stage}")
        overrides = [f"train.device={device}", f"train.seed={seed}", f"data.cache={out / 'input-cache'}"]
        if epochs:
            overrides.append(f"train.epochs={epochs}")
        runs[stage] = train_stage(f"demo-{stage}", overrides=overrides, data=str(root),
                                  out=str(out / "runs" / stage))
        done(f"train {stage}")

    step("calibrate")  # on the validation fold: the IDs neither model trained on
    # fusion weights only: thresholds chosen on the 4 validation images lowered the held-out
    # overall Dice on 2 of 3 phantom variants (benchmarks/robustness.py)
    calibration = calibrate(data, runs["global"] / "best.pt", runs["palm"] / "best.pt", device=device,
                            weights_dir=weights_dir, threshold_grid=(DEFAULT_THRESHOLD,))
    done("calibrate")

    step("evaluate")
    ev = evaluate(heldout, runs["global"] / "best.pt", runs["palm"] / "best.pt", out / "evaluation",
                  device=device, weights_dir=weights_dir)
    done("evaluate")
    return {"evaluation": ev, "calibration": calibration, "times": times, "upscaler": name, "sr": sr,
            "weights_dir": weights_dir, "runs": runs, "plan": plan, "size": size, "seed": seed, "data": data,
            "heldout": heldout, "palm_data": palm_data, "out": out}


def hand_commands(result: dict) -> str:
    """The commands that redo each demo step by hand."""
    o, plan, size, seed = result["out"], result["plan"], result["size"], result["seed"]
    wd = f" --weights-dir {result['weights_dir']}" if result["weights_dir"] else ""

    def epochs(n: int) -> str:
        return f" --epochs {n}" if n else ""

    sr = result["sr"]
    return "\n".join([
        f"twostage synth --out {result['data']} --n {plan.n_train} --size {size} --seed {seed}",
        f"twostage synth --out {result['heldout']} --n {plan.n_test} --size {size} --seed {seed + 1000}",
        *([f"twostage train-sr {result['data']} --out {sr.name} --stage demo-sr{wd} --run {sr.run} --seed {seed}"
           + (f" --steps {plan.sr_steps}" if plan.sr_steps else "")] if sr else []),
        f"twostage prepare-sr {result['data']} --out {result['palm_data']} --upscaler {result['upscaler']}{wd}",
        f"twostage train --stage demo-global --data {result['data']} --out {result['runs']['global']}"
        f"{epochs(plan.global_epochs)}",
        f"twostage train --stage demo-palm --data {result['palm_data']} --out {result['runs']['palm']}"
        f"{epochs(plan.palm_epochs)}",
        f"twostage calibrate {result['data']} --global {result['runs']['global']}/best.pt "
        f"--palm {result['runs']['palm']}/best.pt --thresholds-grid 0.5{wd}",
        f"twostage infer {result['heldout']} --global {result['runs']['global']}/best.pt "
        f"--palm {result['runs']['palm']}/best.pt --fuse --out {o}/fused.csv --split train{wd}",
        f"twostage score {o}/fused.csv --gt {result['heldout']}",
        f"twostage evaluate {result['heldout']} --global {result['runs']['global']}/best.pt "
        f"--palm {result['runs']['palm']}/best.pt --out {o}/evaluation{wd}",
    ])
