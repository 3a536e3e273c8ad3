"""`twostage train-sr`: a super-resolution network trained on the user's own radiographs.

The official Real-ESRGAN files learnt from photographs and are missing on air-gapped machines;
this trains one from the training set itself. Targets are native-resolution patches of each
image's palm region (the prepare-sr context crop: the region the network will upscale), inputs
the same patches through Real-ESRGAN's degradation model (`twostage.sr.degrade`). L1 loss, an
EMA of the weights (what is saved, as `params_ema`), optionally a GAN loss with basicsr's
U-Net discriminator. One loop for every device: Real-ESRGAN's own training pipeline is
hard-wired to CUDA (`.cuda()` in its model) and to its experiments/ layout, so it could be
neither the CPU path nor tested here (docs/DESIGN.md §4).

Every step seeds the global generators from (seed, step), so a resumed run draws exactly the
patches, kernels and noise the uninterrupted one does. The result is written like an official
file into the weights folder and registered in its trained.yaml (`twostage.sr.weights`) with its
sha256, the data it learnt from and its held-out PSNR/SSIM against bicubic, so every command
that takes an upscaler name takes it.
"""
from __future__ import annotations

import copy
import datetime
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import TwostageError
from .discriminator import Discriminator
from .network import build_network, check_name, network_spec
from .patches import Regions, load_regions, sample_patches, step_seed, to_tensor
from .quality import holdout_pairs, quality, quality_table
from .train_config import RUNTIME_KEYS, SRConfig, sr_config_from_dict

log = logging.getLogger(__name__)

STATE = "state.pt"
"""The run folder's resumable state (networks, EMA, optimisers, step)."""


@dataclass
class SRResult:
    """What train-sr wrote and measured."""

    name: str
    path: Path | None
    sha256: str | None
    run: Path
    step: int
    quality: dict
    seconds: float

    @property
    def finished(self) -> bool:
        return self.path is not None


def train_sr(name: str, cfg: SRConfig, weights_dir: str | os.PathLike | None = None, resume: bool = False,
             overwrite: bool = False) -> SRResult:
    """Train `cfg` and, when it reaches train.steps, write NAME.pth into the weights folder and register it.

    `resume` continues the run folder's state (same config but RUNTIME_KEYS); `overwrite`
    starts again over an earlier run folder and replaces a trained network of that name.
    """
    import torch

    from ..devices import torch_device

    t0 = time.perf_counter()
    check_name(name, weights_dir, overwrite or resume)
    run = _run_folder(name, cfg, resume, overwrite)
    dev = torch_device(cfg.train.device, "train.device", allow_auto=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    regions = load_regions(cfg)
    log.info("train-sr: %d training region(s) of %d ID(s), %d held out; %s x%d %s on %s", len(regions.train),
             len(set(regions.train_ids)), len(regions.holdout), cfg.net.arch, cfg.net.scale, cfg.params(), dev)
    trainer = _Trainer(cfg, regions, run, dev, weights_dir)
    trainer.start(resume)
    last_q = _train(trainer, name, min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps))
    if trainer.step < cfg.train.steps:
        log.info("train-sr: stopped at step %d/%d (train.stop_at_step); continue with --resume", trainer.step,
                 cfg.train.steps)
        return SRResult(name, None, None, run, trainer.step, last_q, time.perf_counter() - t0)
    path, sha = _register(name, trainer, last_q, weights_dir)
    return SRResult(name, path, sha, run, trainer.step, last_q, time.perf_counter() - t0)


def _run_folder(name: str, cfg: SRConfig, resume: bool, overwrite: bool) -> Path:
    """The run folder, checked before any work: its state and config for `resume`, else absent,
    empty or (with `overwrite`) an earlier train-sr run, removed; never a folder train-sr did not make."""
    import shutil

    from ..train.run import check_resume_config

    run = Path(cfg.train.out) if cfg.train.out else Path("runs") / f"sr-{name}"
    state_path = run / STATE
    if resume:
        if not state_path.is_file():
            raise TwostageError(f"{state_path}: no train-sr run to resume (run without --resume to start)")
        check_resume_config(cfg, run, sr_config_from_dict, RUNTIME_KEYS, "pass --overwrite to start again")
    elif run.is_dir() and any(run.iterdir()):
        if not state_path.is_file():  # never delete a folder train-sr did not make
            raise TwostageError(f"{run}: exists and is not a train-sr run folder (no {STATE}); choose another --run")
        if not overwrite:
            raise TwostageError(f"{run}: holds a train-sr run already; --resume to continue it, --overwrite to "
                                "start again, or another --run")
        shutil.rmtree(run)
    return run


class _Trainer:
    """One run's networks, optimisers, degradation and held-out pairs, and its step count.

    Built in one order on every run (the generator, its EMA, the discriminator and the held-out
    degradations draw from the global generators), so a resumed run starts as the first one did.
    """

    def __init__(self, cfg: SRConfig, regions: Regions, run: Path, dev, weights_dir: str | os.PathLike | None):
        import torch

        from ..train.loss import lr_lambda
        from .degrade import Degrader
        from .upscale import make_upscaler

        self.cfg, self.regions, self.run, self.dev = cfg, regions, run, dev
        self.net = build_network(cfg, weights_dir).to(dev).train()
        self.ema = copy.deepcopy(self.net).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.99))
        self.lr_at = lr_lambda(cfg.train.steps, 0, cfg.optim.min_lr_ratio)
        self.disc = Discriminator(cfg, dev) if cfg.loss.gan > 0 else None
        self.degrader = Degrader(cfg.degradation, cfg.net.scale, dev)  # installs the basicsr import shim
        self.usm = None
        if cfg.loss.gt_usm:
            from basicsr.utils import USMSharp

            self.usm = USMSharp().to(dev)  # Real-ESRGAN's sharpened targets
        self.pairs = holdout_pairs(regions.holdout, cfg, dev)
        self.bicubic = make_upscaler("bicubic", scale=cfg.net.scale)
        self.step = 0

    def start(self, resume: bool) -> None:
        """Continue the run folder's state (`resume`), or make the folder: config.yaml and a first state."""
        import yaml

        from ..checkpoint import load_weights_only
        from ..io.files import make_dir, write_text_atomic

        if resume:
            state = load_weights_only(self.run / STATE, "train-sr state", map_location=self.dev)
            self.net.load_state_dict(state["net"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optim"])
            if self.disc is not None:
                self.disc.load(state)
            self.step = int(state["step"])
            log.info("train-sr: resuming %s at step %d/%d", self.run, self.step, self.cfg.train.steps)
            return
        make_dir(self.run)
        write_text_atomic(self.run / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False,
                                                                   default_flow_style=None))
        self.save()  # from now on the folder is recognisably a train-sr run

    def save(self) -> None:
        """Write the resumable state (atomically: an interrupted save leaves the previous one)."""
        from ..checkpoint import save_atomic

        state = {"step": self.step, "net": self.net.state_dict(), "ema": self.ema.state_dict(),
                 "optim": self.opt.state_dict(), **(self.disc.state() if self.disc is not None else {})}
        save_atomic(state, self.run / STATE)

    def train_step(self):
        """One step, seeded from (seed, step): patches, their degraded inputs, the updates and the EMA.
        Returns the loss (a tensor)."""
        import torch

        from ..train.run import seed_everything

        cfg = self.cfg
        seed_everything(step_seed(cfg.train.seed, self.step))
        gt = to_tensor(sample_patches(self.regions.train, cfg.train.batch_size, cfg.data.gt_size), self.dev)
        if self.usm is not None:
            gt = self.usm(gt)
        lq = self.degrader(gt)
        out = self.net(lq)
        loss = cfg.loss.l1 * torch.nn.functional.l1_loss(out, gt)
        if self.disc is not None:
            loss = loss + self.disc.generator_loss(out)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in self.opt.param_groups:
            g["lr"] = cfg.optim.lr * self.lr_at(self.step)
        self.opt.step()
        if self.disc is not None:
            self.disc.step(out.detach(), gt)
        self.step += 1
        decay = min(cfg.optim.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.net.parameters()):
                e.lerp_(p, 1 - decay)
            for e, b in zip(self.ema.buffers(), self.net.buffers()):
                e.copy_(b)
        return loss

    def evaluate(self, loss: float) -> dict:
        """Score the EMA network and bicubic on the held-out pairs; logged and appended to metrics.csv."""
        from ..train.run import append_metrics

        scale = self.cfg.net.scale
        q = quality({"network": _live(self.ema, scale, self.dev), "bicubic": self.bicubic}, self.pairs, scale)
        log.info("train-sr step %d: held-out PSNR/SSIM\n%s", self.step, quality_table(q))
        append_metrics(self.run / "metrics.csv", _metrics_row(self.step, loss, q), METRICS_FIELDS, key="step")
        return q


def _train(trainer: _Trainer, name: str, stop: int) -> dict:
    """Steps up to `stop`, saving and scoring as they fall due; Ctrl-C ends the run after a step,
    with its state saved. Returns the last held-out scores ({} when none fell due)."""
    from tqdm import tqdm

    cfg = trainer.cfg
    last_q: dict = {}
    bar = tqdm(total=stop, initial=trainer.step, desc=f"train-sr {name}", unit="step", disable=None)
    interrupted = _StepBoundaryInterrupt()
    first, t_first = trainer.step, time.perf_counter()
    try:
        while trainer.step < stop:
            loss = trainer.train_step()
            step = trainer.step
            bar.update(1)
            bar.set_postfix(l1=f"{loss.item():.4f}")
            if step == first + PACE_STEPS:
                _log_pace((time.perf_counter() - t_first) / PACE_STEPS, cfg.train.steps - step, trainer.dev)
            if step % cfg.train.save_every == 0 or step == stop:
                trainer.save()
            if step % cfg.train.val_every == 0 or step == cfg.train.steps:
                last_q = trainer.evaluate(loss.item())
            if interrupted:
                trainer.save()
                log.warning("train-sr: interrupted after step %d; state saved, continue with --resume", step)
                raise KeyboardInterrupt
    finally:
        interrupted.restore()
        bar.close()
    return last_q


def _register(name: str, trainer: _Trainer, last_q: dict,
              weights_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """Write the EMA weights as NAME.pth into the weights folder and enter it in trained.yaml with
    its sha256, what it learnt from and its held-out scores. Returns (path, sha256)."""
    import dataclasses

    from ..checkpoint import save_atomic
    from ..io.files import sha256_file
    from . import weights

    cfg, regions = trainer.cfg, trainer.regions
    directory = weights.weights_dir(weights_dir)
    spec = network_spec(cfg, name)
    path = directory / spec.file
    # the same weights are the same bytes, so the sha256 a palm set records repeats
    save_atomic({"params_ema": {k: v.detach().cpu().contiguous() for k, v in trainer.ema.state_dict().items()}},
                path)
    sha = sha256_file(path)
    trained_on = {"data": str(Path(cfg.data.root).resolve()), "images": len(regions.train),
                  "holdout_ids": regions.holdout_ids, "steps": trainer.step, "seed": cfg.train.seed,
                  "run": str(trainer.run.resolve()), "degradation": "Real-ESRGAN second-order (twostage.sr.degrade)",
                  "quality": last_q,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    weights.register_trained(dataclasses.replace(spec, sha256=sha, trained_on=trained_on), weights_dir)
    log.info("train-sr: wrote %s (sha256 %s), registered as %r in %s", path, sha, name,
             directory / weights.TRAINED_NAME)
    return path, sha


PACE_STEPS = 10
"""After this many steps train-sr logs its pace and the time left (tqdm's ETA is not shown in logs)."""


def _log_pace(seconds_per_step: float, left: int, dev) -> None:
    hint = " (stages/demo-sr.yaml is sized for a CPU)" if dev.type == "cpu" and seconds_per_step * left > 3600 else ""
    log.info("train-sr: %.2f s per step on %s: about %s for the %d steps left%s", seconds_per_step, dev,
             elapsed(seconds_per_step * left), left, hint)


class _StepBoundaryInterrupt:
    """Ctrl-C ends the run after the current step, so the saved state is one the uninterrupted
    run passes through; a second Ctrl-C stops at once (the last periodic state stays)."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("train-sr: Ctrl-C: stopping after this step (again to stop at once)")

    def __bool__(self) -> bool:
        return self.requested

    def restore(self) -> None:
        if self._old is not None:
            import signal

            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _live(model, scale: int, dev):
    """An Upscaler around a copy of an in-memory network (scored exactly as a loaded file would be)."""
    from .upscale import network_upscaler

    return network_upscaler(copy.deepcopy(model).eval(), "live", scale, None, device=str(dev))


METRICS_FIELDS = ["step", "l1"] + [f"{kind}_{name}_{m}" for kind in ("clean", "degraded")
                                    for name in ("network", "bicubic") for m in ("psnr", "ssim")]
"""Columns of a train-sr run's metrics.csv: the loss and the held-out scores (`quality`)."""


def _metrics_row(step: int, loss: float, q: dict) -> dict:
    row = {"step": step, "l1": round(loss, 6)}
    for kind, scores in q.items():
        for name, v in scores.items():
            row[f"{kind}_{name}_psnr"], row[f"{kind}_{name}_ssim"] = v["psnr"], v["ssim"]
    return row


def elapsed(seconds: float) -> str:
    """A duration as s, min or h."""
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{math.ceil(seconds)} s"
