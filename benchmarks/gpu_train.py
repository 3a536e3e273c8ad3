"""Does the GPU, not the loader, set the pace of training? The real configs on one GPU.

    python benchmarks/gpu_train.py [--device cuda] [--n 64] [--epochs 4] [--json OUT.json]
    python benchmarks/gpu_train.py --device cpu --size 512 --n 8 --epochs 2 --set model.input_size=128 \\
        --set model.encoder=resnet18 --set model.arch=Unet      # the script itself, on a CPU

Writes `--n` phantoms of 2048² and their palm crops (prepare-sr, bicubic x4: the crop size of
RealESRGAN_x4plus), then for stages/global.yaml and stages/palm.yaml (random-init encoders:
the GPU machine has no network; no validation, `data.fold=-1`) measures, in this process,
through the trainer's own functions:

  cache     the one-time build of the training-input cache (all cores)
  compute   one training step (`loop.train_step`) on a batch already in pinned memory: what
            a step costs when the loader is never waited for (augmentation on the device,
            forward, backward, optimiser; AMP, channels-last), and the GPU utilisation then
  network   the network's part alone (forward, loss, backward, GradScaler step on a ready
            input, no host synchronisation between steps): the GPU's own pace
  epoch     whole epochs through the DataLoader (train.workers: auto), the first one left out
            (worker start, cuDNN autotuning); the ratio epoch / (steps x compute) shows any
            time the GPU waits for the loader (target <= 1.2)
  util      GPU utilisation sampled every 200 ms by nvidia-smi during those epochs (target >= 85 %)

and prints one table; `--json` writes it. `benchmarks/gpu_check.py` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EPOCH_TARGET, UTIL_TARGET = 1.2, 85.0


class Utilisation:
    """GPU utilisation samples (time, %) from `nvidia-smi -lms 200` in the background."""

    def __init__(self, device_index: int):
        self.samples: list[tuple[float, float]] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "-i", str(device_index), "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "200"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                continue

    def mean(self, t0: float, t1: float) -> float | None:
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        return statistics.fmean(vals) if vals else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def network_only(cfg, fit, batch: dict, meta: dict, steps: int, sync) -> float:
    """Seconds per step of forward + loss + backward + optimiser on one ready input, queued
    back to back (one synchronisation at the end)."""
    import torch

    from twostage.models import input_hw, normalize
    from twostage.train.augment import make_batch
    from twostage.train.loss import bce_dice_loss

    b = make_batch(batch, input_hw(cfg.model.input_size), fit.device)
    x = normalize(b.images, meta["normalization"]["mean"], meta["normalization"]["std"], cfg.model.in_channels)
    if fit.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        fit.opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=fit.device.type, dtype=torch.float16, enabled=fit.amp):
            logits = fit.net(x)
        fit.scaler.scale(bce_dice_loss(logits, b.masks, cfg.loss.bce, cfg.loss.dice)).backward()
        fit.scaler.step(fit.opt)
        fit.scaler.update()

    for _ in range(2):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t) / steps


def stage_figures(stage: str, root: Path, work: Path, args, util: Utilisation | None, batch_size: int) -> dict:
    import torch

    from twostage.config import load_config
    from twostage.train.distributed import init_dist
    from twostage.train.loop import build_fit, loader_workers, train_epoch, train_step
    from twostage.train.run import seed_everything, stage_meta
    from twostage.train.sources import stage_datasets

    overrides = ["model.encoder_weights=none", "data.fold=-1", f"data.cache={work / 'cache'}", *args.set]
    if batch_size:
        overrides.append(f"train.batch_size={batch_size}")
    cfg = load_config(stage, overrides=overrides, data=str(root), device=args.device, epochs=args.epochs,
                      out=str(work / "runs" / stage))
    run = Path(cfg.train.out)
    run.mkdir(parents=True, exist_ok=True)
    dist, device = init_dist(cfg.train.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    train_ds, _, extra = stage_datasets(cfg, [root], run, dist, device)
    cache_s = time.perf_counter() - t
    seed_everything(cfg.train.seed)
    fit = build_fit(cfg, train_ds, device, dist)
    meta = stage_meta(cfg, extra)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    batch = next(iter(fit.loader))  # one collated batch, kept in (pinned) host memory
    if cuda:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        train_step(cfg, fit, batch, meta, dist)
    sync()
    t = time.perf_counter()
    for _ in range(args.compute_steps):
        train_step(cfg, fit, batch, meta, dist)
    sync()
    t1 = time.perf_counter()
    compute = (t1 - t) / args.compute_steps
    compute_util = util.mean(t, t1) if util else None
    t = time.perf_counter()
    network = network_only(cfg, fit, batch, meta, args.compute_steps, sync)
    network_util = util.mean(t, time.perf_counter()) if util else None

    steps = len(fit.loader)
    epochs = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        train_epoch(cfg, fit, train_ds, meta, epoch, dist, run)
        sync()
        t1 = time.perf_counter()
        epochs.append((t0, t1))
    timed = epochs[1:] or epochs
    epoch_s = statistics.fmean(t1 - t0 for t0, t1 in timed)
    utils = [u for u in (util.mean(t0, t1) for t0, t1 in timed) if u is not None] if util else []
    return {"stage": stage, "arch": f"{cfg.model.arch}+{cfg.model.encoder}", "input": cfg.model.input_size,
            "batch": cfg.train.batch_size, "images": len(train_ds), "workers": loader_workers(cfg),
            "cache_s": round(cache_s, 2), "cache_mib": round(train_ds.cache.nbytes / 2**20, 1),
            "compute_ms": round(compute * 1000, 1), "img_per_s": round(cfg.train.batch_size / compute, 1),
            "compute_util": None if compute_util is None else round(compute_util, 1),
            "network_ms": round(network * 1000, 1),
            "network_util": None if network_util is None else round(network_util, 1),
            "steps": steps, "epoch_s": round(epoch_s, 2),
            "epoch_vs_compute": round(epoch_s / (steps * compute), 3),
            "util": round(statistics.fmean(utils), 1) if utils else None,
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if cuda else None}


def _pct(v: float | None) -> str:
    return "  - " if v is None else f"{v:3.0f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=2048, help="phantom side (default 2048)")
    p.add_argument("--n", type=int, default=64, help="training images (default 64: 16 steps at batch 4)")
    p.add_argument("--epochs", type=int, default=4, help="epochs timed (the first is left out of the figures)")
    p.add_argument("--compute-steps", type=int, default=20, help="steps on one ready batch (default 20)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[0], help="train.batch_size (0: the config's); "
                   "several: each in turn")
    p.add_argument("--stages", nargs="+", default=["global", "palm"], choices=["global", "palm"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for both stages")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args(argv)

    import torch

    from twostage.data.synth import synthesize
    from twostage.sr.prepare import prepare_sr

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_train: CUDA is not available here (use --device cpu to try the script itself)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        data = synthesize(work / "data", n=a.n, size=a.size, seed=0)
        palm = work / "palm"
        if "palm" in a.stages:
            prepare_sr(data, palm, upscaler="bicubic", scale=4)
        print(f"data: {a.n} phantoms of {a.size}² and their palm crops in {time.perf_counter() - t:.0f} s", flush=True)
        util = Utilisation(torch.device(a.device).index or 0) if cuda else None
        try:
            for batch_size in a.batch_size:
                for stage in a.stages:
                    rows.append(stage_figures(stage, palm if stage == "palm" else data, work, a, util, batch_size))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            if util:
                util.stop()

    name = torch.cuda.get_device_name(a.device) if cuda else "cpu"
    print(f"\ntraining input on {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print(f"{'stage':7s}{'model':>30s}{'batch':>6s}{'workers':>8s}{'cache s':>8s}{'network ms (util)':>18s}"
          f"{'compute ms (util)':>18s}{'img/s':>7s}{'epoch s':>8s}{'steps':>6s}{'epoch/compute':>14s}"
          f"{'GPU util %':>11s}{'peak GiB':>9s}")
    ok = True
    for r in rows:
        ratio_ok = r["epoch_vs_compute"] <= EPOCH_TARGET
        util_ok = r["util"] is None or r["util"] >= UTIL_TARGET
        ok &= ratio_ok and util_ok
        print(f"{r['stage']:7s}{r['arch']:>30s}{r['batch']:>6d}{r['workers']:>8d}{r['cache_s']:>8.1f}"
              f"{r['network_ms']:>10.1f} ({_pct(r['network_util'])}){r['compute_ms']:>10.1f} ({_pct(r['compute_util'])})"
              f"{r['img_per_s']:>7.1f}{r['epoch_s']:>8.2f}{r['steps']:>6d}"
              f"{r['epoch_vs_compute']:>10.2f}{'' if ratio_ok else ' FAIL':>4s}"
              f"{'-' if r['util'] is None else format(r['util'], '.0f'):>7s}{'' if util_ok else ' FAIL':>4s}"
              f"{'-' if r['peak_gib'] is None else r['peak_gib']:>9}")
    print(f"targets: epoch <= {EPOCH_TARGET}x compute, GPU utilisation >= {UTIL_TARGET:.0f} %")
    if a.json:
        a.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0 if ok or not cuda else 1


if __name__ == "__main__":
    sys.exit(main())
