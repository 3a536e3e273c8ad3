"""`twostage demo`: the whole product on synthetic data, in minutes, on a laptop CPU.

synth (train + a held-out set with another seed) → prepare-sr → train global → train palm →
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

DEMO_PARTS = ("data", "heldout", "palm-data", "runs", "evaluation")
"""The sub-folders a demo run writes (and `--overwrite` replaces)."""

REAL_ESRGAN = "RealESRGAN_x4plus"
"""The upscaler the demo uses when its weights are present under weights/."""


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run; `quick` trades accuracy for a ≤3 minute run."""

    n_train: int
    n_test: int
    global_epochs: int
    palm_epochs: int

    @classmethod
    def for_mode(cls, quick: bool) -> "DemoPlan":
        return cls(n_train=16, n_test=6, global_epochs=30, palm_epochs=25) if quick else \
            cls(n_train=32, n_test=16, global_epochs=0, palm_epochs=0)  # 0: the demo config's own


def choose_upscaler(weights_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """Real-ESRGAN if its weights are usable here, else bicubic; returns (name, reason)."""
    from .sr import make_upscaler

    try:
        make_upscaler(REAL_ESRGAN, weights_dir=weights_dir)
    except TwostageError as e:
        return "bicubic", f"Real-ESRGAN weights not usable ({e}); using the bicubic upscaler"
    return REAL_ESRGAN, f"using {REAL_ESRGAN} (weights found)"


def run_demo(out: str | os.PathLike = "twostage-demo", size: int = 512, quick: bool = False,
             seed: int = 0, device: str = "cpu", weights_dir: str | os.PathLike | None = None,
             overwrite: bool = False) -> dict:
    """Run every step of the product on phantoms and return what was written and measured.

    An OUT folder that already holds files is an error unless `overwrite`, which replaces the
    demo's own sub-folders (data, heldout, palm-data, runs, evaluation) and nothing else.
    """
    from .calibrate import calibrate
    from .fusion import DEFAULT_THRESHOLD
    from .evaluate import evaluate
    from .prepare import prepare_sr
    from .synth import synthesize
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

    step("prepare-sr")
    upscaler, reason = choose_upscaler(weights_dir)
    log.info("   %s", reason)
    palm_data = out / "palm-data"
    prepare_sr(data, palm_data, upscaler=upscaler, device=device, weights_dir=weights_dir)
    done("prepare-sr")

    runs = {}
    for stage, root, epochs in (("global", data, plan.global_epochs), ("palm", palm_data, plan.palm_epochs)):
        step(f"train {stage}")
        overrides = [f"train.device={device}", f"train.seed={seed}"]
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
                  device=device)
    done("evaluate")
    return {"evaluation": ev, "calibration": calibration, "times": times, "upscaler": upscaler, "runs": runs, "plan": plan,
            "size": size, "seed": seed, "data": data, "heldout": heldout, "palm_data": palm_data,
            "out": out}


def hand_commands(result: dict) -> str:
    """The commands that redo each demo step by hand."""
    o, plan, size, seed = result["out"], result["plan"], result["size"], result["seed"]

    def epochs(n: int) -> str:
        return f" --epochs {n}" if n else ""

    return "\n".join([
        f"twostage synth --out {result['data']} --n {plan.n_train} --size {size} --seed {seed}",
        f"twostage synth --out {result['heldout']} --n {plan.n_test} --size {size} --seed {seed + 1000}",
        f"twostage prepare-sr {result['data']} --out {result['palm_data']} --upscaler {result['upscaler']}",
        f"twostage train --stage demo-global --data {result['data']} --out {result['runs']['global']}"
        f"{epochs(plan.global_epochs)}",
        f"twostage train --stage demo-palm --data {result['palm_data']} --out {result['runs']['palm']}"
        f"{epochs(plan.palm_epochs)}",
        f"twostage calibrate {result['data']} --global {result['runs']['global']}/best.pt "
        f"--palm {result['runs']['palm']}/best.pt --thresholds-grid 0.5",
        f"twostage infer {result['heldout']} --global {result['runs']['global']}/best.pt "
        f"--palm {result['runs']['palm']}/best.pt --fuse --out {o}/fused.csv --split train",
        f"twostage score {o}/fused.csv --gt {result['heldout']}",
        f"twostage evaluate {result['heldout']} --global {result['runs']['global']}/best.pt "
        f"--palm {result['runs']['palm']}/best.pt --out {o}/evaluation",
    ])
