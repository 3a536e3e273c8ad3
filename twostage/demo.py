"""`twostage demo`: the whole product on synthetic data, in minutes, on a laptop CPU.

synth (train + a held-out set with another seed) → train-sr (an X-ray super-resolution network
trained on the demo's own training images, when the official Real-ESRGAN weights are not
there) → prepare-sr → train global → train palm →
calibrate (per-class fusion weights and thresholds on the validation fold, which neither model
trained on) → evaluate (the held-out set global-only, fused with the default weights and with
the calibrated ones; pictures).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import TwostageError

if TYPE_CHECKING:  # the steps' results; their modules are imported when the demo runs
    from .evaluation.calibrate import Calibration
    from .evaluation.evaluate import Evaluation
    from .sr.training import SRResult

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


@dataclass(frozen=True)
class DemoResult:
    """What a demo run wrote and measured, with what `hand_commands` needs to redo each step."""

    out: Path
    data: Path                                # the training set
    heldout: Path                             # the held-out set (seed + 1000)
    palm_data: Path                           # prepare-sr's palm set
    runs: dict[str, Path]                     # "global", "palm": the training runs
    upscaler: str                             # the upscaler prepare-sr used
    weights_dir: str | os.PathLike | None     # where that upscaler's weights are
    sr: SRResult | None                       # the upscaler trained here, or None
    calibration: Calibration
    evaluation: Evaluation
    times: dict[str, float]                   # seconds per step, in the order they ran
    plan: DemoPlan
    size: int
    seed: int


def run_demo(out: str | os.PathLike = "twostage-demo", size: int = 512, quick: bool = False,
             seed: int = 0, device: str = "cpu", weights_dir: str | os.PathLike | None = None,
             overwrite: bool = False, upscaler: str = "auto") -> DemoResult:
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

    out = Path(out)
    _clear_out(out, overwrite)
    plan = DemoPlan.for_mode(quick)
    times: dict[str, float] = {}
    name, reason = choose_upscaler(upscaler, weights_dir)  # a bad --upscaler fails before any work

    with _step(times, "synth"):
        data = synthesize(out / "data", n=plan.n_train, size=size, seed=seed)
        heldout = synthesize(out / "heldout", n=plan.n_test, size=size, seed=seed + 1000)
    log.info("upscaler: %s", reason)
    sr = None
    if name is None:
        with _step(times, "train-sr"):
            weights_dir, name = out / "weights", DEMO_SR
            sr = _train_sr(name, weights_dir, out, data, plan, device, seed)
    with _step(times, "prepare-sr"):
        palm_data = out / "palm-data"
        prepare_sr(data, palm_data, upscaler=name, device=device, weights_dir=weights_dir)
    runs = _train_stages(out, data, palm_data, plan, device, seed, times)
    with _step(times, "calibrate"):  # on the validation fold: the IDs neither model trained on
        # fusion weights only: thresholds chosen on the 4 validation images lowered the held-out
        # overall Dice on 2 of 3 phantom variants (benchmarks/robustness.py)
        calibration = calibrate(data, runs["global"] / "best.pt", runs["palm"] / "best.pt", device=device,
                                weights_dir=weights_dir, threshold_grid=(DEFAULT_THRESHOLD,))
    with _step(times, "evaluate"):
        ev = evaluate(heldout, runs["global"] / "best.pt", runs["palm"] / "best.pt", out / "evaluation",
                      device=device, weights_dir=weights_dir)
    return DemoResult(out=out, data=data, heldout=heldout, palm_data=palm_data, runs=runs, upscaler=name,
                      weights_dir=weights_dir, sr=sr, calibration=calibration, evaluation=ev, times=times,
                      plan=plan, size=size, seed=seed)


def _clear_out(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that holds files, unless `overwrite`: then remove the demo's own sub-folders."""
    if out.exists() and not out.is_dir():
        raise TwostageError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TwostageError(f"{out}: already holds files (an earlier demo?); pass --overwrite to replace "
                                "the demo's outputs there, or choose another --out")
        for name in DEMO_PARTS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)


@contextlib.contextmanager
def _step(times: dict[str, float], name: str) -> Iterator[None]:
    """Log a step's start and its seconds, and record them in `times` (a failing step is not)."""
    t0 = time.perf_counter()
    log.info("== %s ==", name)
    yield
    times[name] = time.perf_counter() - t0
    log.info("   %s: %.0f s", name, times[name])


def _train_sr(name: str, weights_dir: Path, out: Path, data: Path, plan: DemoPlan, device: str, seed: int
              ) -> SRResult:
    """Train the demo's X-ray upscaler on the training set into `weights_dir`."""
    from .sr.train_config import load_sr_config
    from .sr.training import train_sr

    overrides = [f"train.device={device}", f"train.seed={seed}", f"train.out={out / 'runs' / 'sr'}"]
    if plan.sr_steps:
        overrides.append(f"train.steps={plan.sr_steps}")
    return train_sr(name, load_sr_config("demo-sr", overrides=overrides, data=str(data)), weights_dir=weights_dir,
                    overwrite=True)


def _train_stages(out: Path, data: Path, palm_data: Path, plan: DemoPlan, device: str, seed: int,
                  times: dict[str, float]) -> dict[str, Path]:
    """Train the global model on the training set and the palm model on the palm set."""
    from .train import train_stage

    runs = {}
    for stage, root, epochs in (("global", data, plan.global_epochs), ("palm", palm_data, plan.palm_epochs)):
        with _step(times, f"train {stage}"):
            overrides = [f"train.device={device}", f"train.seed={seed}", f"data.cache={out / 'input-cache'}"]
            if epochs:
                overrides.append(f"train.epochs={epochs}")
            runs[stage] = train_stage(f"demo-{stage}", overrides=overrides, data=str(root),
                                      out=str(out / "runs" / stage))
    return runs


def hand_commands(result: DemoResult) -> str:
    """The commands that redo each demo step by hand."""
    o, plan, size, seed = result.out, result.plan, result.size, result.seed
    wd = f" --weights-dir {result.weights_dir}" if result.weights_dir else ""
    g, p = result.runs["global"], result.runs["palm"]

    def epochs(n: int) -> str:
        return f" --epochs {n}" if n else ""

    sr = result.sr
    return "\n".join([
        f"twostage synth --out {result.data} --n {plan.n_train} --size {size} --seed {seed}",
        f"twostage synth --out {result.heldout} --n {plan.n_test} --size {size} --seed {seed + 1000}",
        *([f"twostage train-sr {result.data} --out {sr.name} --stage demo-sr{wd} --run {sr.run} --seed {seed}"
           + (f" --steps {plan.sr_steps}" if plan.sr_steps else "")] if sr else []),
        f"twostage prepare-sr {result.data} --out {result.palm_data} --upscaler {result.upscaler}{wd}",
        f"twostage train --stage demo-global --data {result.data} --out {g}{epochs(plan.global_epochs)}",
        f"twostage train --stage demo-palm --data {result.palm_data} --out {p}{epochs(plan.palm_epochs)}",
        f"twostage calibrate {result.data} --global {g}/best.pt --palm {p}/best.pt --thresholds-grid 0.5{wd}",
        f"twostage infer {result.heldout} --global {g}/best.pt --palm {p}/best.pt --fuse --out {o}/fused.csv "
        f"--split train{wd}",
        f"twostage score {o}/fused.csv --gt {result.heldout}",
        f"twostage evaluate {result.heldout} --global {g}/best.pt --palm {p}/best.pt --out {o}/evaluation{wd}",
    ])
