"""Failures on the device: out of memory in training, inference and SR is one error naming the
step and what to lower; a non-finite loss stops training before its update, naming the epoch,
the step and the last good checkpoint; AMP steps GradScaler skips are counted; `--skip-bad`
also covers images that fail inside the chain.

Allocation failures are real where a size can be made absurd (a checkpoint whose input size
is 2^20 × 2^20: torch's allocator refuses the 4 TiB at once); elsewhere a forward that asks the
allocator for 32 TiB, or raises the `torch.cuda.OutOfMemoryError` a CUDA device would.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from torch import nn

from twostage.checkpoint import load_checkpoint
from twostage.classes import CLASSES, PALM_CLASSES
from twostage.cli import main
from twostage.config import load_config
from twostage.errors import TwostageError

HUGE = 1 << 20
"""An input side whose (1, 3, HUGE, HUGE) float tensor (12 TiB) no allocator grants."""

TINY = ["model.arch=Unet", "model.encoder=resnet18", "model.encoder_weights=none",
        "model.kwargs={encoder_depth: 3, decoder_channels: [16, 8, 8]}", "data.folds=4", "data.preload=true"]


def allocate_too_much(*_, **__):
    """A real allocation failure: torch's CPU allocator refuses 32 TiB (RuntimeError 'can't allocate memory')."""
    return torch.empty(1 << 45, dtype=torch.uint8)


def cuda_out_of_memory(*_, **__):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 15.7 GiB total)")


@pytest.fixture(scope="module")
def world(make_world, make_tiny_checkpoint) -> dict:
    world = make_world("device", size=96, seed=2)
    root = world["root"]
    return {**world,
            "huge_global": make_tiny_checkpoint(root / "huge_global.pt", "global", input_size=HUGE),
            "huge_palm": make_tiny_checkpoint(root / "huge_palm.pt", "palm", classes=PALM_CLASSES, input_size=HUGE)}


def one_error_line(capsys) -> str:
    return assert_one_line_error(capsys.readouterr().err)


# --------------------------------------------------------------------------- the mapping itself

@pytest.mark.parametrize("make", [lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                  lambda: MemoryError("Unable to allocate 32.0 TiB"), None])
def test_allocation_failures_become_one_error(make):
    from twostage.devices import out_of_memory_as_error

    with pytest.raises(TwostageError, match=r"^out of memory in the step; lower --the-option$"):
        with out_of_memory_as_error("the step", "--the-option"):
            if make is None:
                allocate_too_much()
            raise make()


def test_other_runtime_errors_pass_through():
    from twostage.devices import out_of_memory_as_error

    with pytest.raises(RuntimeError, match="shape mismatch"):
        with out_of_memory_as_error("the step", "--the-option"):
            raise RuntimeError("shape mismatch")


# --------------------------------------------------------------------------- inference

def test_infer_global_out_of_memory(world, tmp_path, capsys):
    """A real allocation failure in the global model: one line naming the step and --batch-size; no CSV."""
    out = tmp_path / "out.csv"
    rc = main(["infer", str(world["data"]), "--split", "train", "--global", str(world["huge_global"]),
               "--out", str(out), "--batch-size", "2"])
    line = one_error_line(capsys)
    assert rc == 2 and "out of memory in infer: the global model (2 image(s) of 96x96 on cpu)" in line
    assert "lower --batch-size (now 2)" in line and not out.exists()


def test_infer_palm_out_of_memory(world, tmp_path, capsys):
    """A real allocation failure in the palm model names the palm step and its input size."""
    out = tmp_path / "out.csv"
    rc = main(["infer", str(world["data"]), "--split", "train", "--global", str(world["global"]),
               "--palm", str(world["huge_palm"]), "--fuse", "--out", str(out)])
    line = one_error_line(capsys)
    assert rc == 2 and "the palm step of" in line and "palm model's input size" in line and not out.exists()


def test_infer_cuda_out_of_memory_in_the_upscaler(world, tmp_path, monkeypatch, capsys):
    from twostage.sr import upscale as sr

    real = sr.Upscaler.__init__

    def failing(self, name, scale, sha, fn, **kw):
        real(self, name, scale, sha, cuda_out_of_memory, **kw)

    monkeypatch.setattr(sr.Upscaler, "__init__", failing)
    rc = main(["infer", str(world["data"]), "--split", "train", "--global", str(world["global"]),
               "--palm", str(world["palm"]), "--fuse", "--out", str(tmp_path / "out.csv")])
    line = one_error_line(capsys)
    assert rc == 2 and "bicubic: upscaling a" in line and "crop x4 on cpu" in line


def test_skip_bad_retries_a_failing_batch_image_by_image(world, tmp_path, monkeypatch):
    """A batch of 2 runs out of memory, single images do not: with --skip-bad nothing is lost,
    the CSV equals a batch-size-1 run."""
    from twostage.inference.infer import infer
    from twostage.models import Predictor

    ref = tmp_path / "ref.csv"
    infer(world["data"], world["global"], ref, split="train")
    real = Predictor.native_probs

    def small_batches_only(self, images, **kw):
        if len(images) > 1:
            cuda_out_of_memory()
        return real(self, images, **kw)

    monkeypatch.setattr(Predictor, "native_probs", small_batches_only)
    with pytest.raises(TwostageError, match="batch-size"):
        infer(world["data"], world["global"], tmp_path / "stopped.csv", split="train", batch_size=2)
    out = tmp_path / "out.csv"
    summary = infer(world["data"], world["global"], out, split="train", batch_size=2, skip_bad=True)
    assert not summary.skipped and out.read_bytes() == ref.read_bytes()


def test_skip_bad_covers_an_image_failing_inside_the_chain(world, tmp_path, monkeypatch):
    """One image runs out of memory in the palm step: it alone is written empty and listed; the
    others' rows equal those of a run where nothing failed."""
    from twostage.inference.chain import PalmStage
    from twostage.inference.infer import infer
    from twostage.rle import read_csv

    ref = tmp_path / "ref.csv"
    infer(world["data"], world["global"], ref, split="train", palm_ckpt=world["palm"], fuse=True)
    names = list(read_csv(ref))  # the order images are run in
    real, calls = PalmStage.regions, []

    def fail_on_second(self, crops, boxes, device):
        calls.append(1)
        if len(calls) == 2:
            allocate_too_much()
        return real(self, crops, boxes, device)

    monkeypatch.setattr(PalmStage, "regions", fail_on_second)
    out = tmp_path / "out.csv"
    summary = infer(world["data"], world["global"], out, split="train", palm_ckpt=world["palm"], fuse=True,
                    skip_bad=True)
    got, want = read_csv(out), read_csv(ref)
    assert [Path(p).name for p in summary.skipped] == [names[1]]
    assert set(got[names[1]].values()) == {""}
    assert {n: got[n] for n in names if n != names[1]} == {n: want[n] for n in names if n != names[1]}


def test_skip_bad_covers_a_broken_upscaler(world, tmp_path, make_sr_weights, make_tiny_checkpoint, capsys):
    """A real failure inside the chain, no patching: a Real-ESRGAN weight file of NaNs makes the
    upscaler's output non-finite. Without --skip-bad one line naming it and no CSV; with it,
    every image is listed and written empty (29 rows each), exit 0."""
    import yaml

    from twostage.io.files import sha256_file

    wdir = tmp_path / "weights"
    wdir.mkdir()
    manifest = make_sr_weights(wdir)
    entries = yaml.safe_load(manifest.read_text())["weights"]
    state = torch.load(wdir / "vgg-x4.pth", weights_only=True)
    torch.save({"params_ema": {k: torch.full_like(v, float("nan")) for k, v in state["params_ema"].items()}},
               wdir / "vgg-x4.pth")
    entries["vgg-x4"]["sha256"] = sha256_file(wdir / "vgg-x4.pth")
    manifest.write_text(yaml.safe_dump({"weights": entries}))
    palm = make_tiny_checkpoint(tmp_path / "palm.pt", "palm", classes=PALM_CLASSES)
    ckpt = torch.load(palm, weights_only=True)
    ckpt["meta"]["palm_set"] = {"upscaler": "vgg-x4", "scale": 4, "weight_sha256": entries["vgg-x4"]["sha256"]}
    torch.save(ckpt, palm)
    args = ["infer", str(world["data"]), "--split", "train", "--global", str(world["global"]), "--palm", str(palm),
            "--fuse", "--weights-dir", str(wdir)]
    assert main([*args, "--out", str(tmp_path / "stopped.csv")]) == 2
    assert "vgg-x4: non-finite output" in one_error_line(capsys) and not (tmp_path / "stopped.csv").exists()
    out = tmp_path / "out.csv"
    assert main([*args, "--out", str(out), "--skip-bad"]) == 0
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 4 * len(CLASSES) and all(r.endswith(",") for r in rows)
    assert "4 image(s) unreadable or failing in the chain" in capsys.readouterr().out


# --------------------------------------------------------------------------- SR

def test_prepare_sr_out_of_memory(world, tmp_path, make_sr_weights, monkeypatch, capsys):
    """The network upscaler asks the allocator for too much: prepare-sr stops with one line naming --tile."""
    from twostage.sr.compat import import_basicsr

    wdir = tmp_path / "weights"
    wdir.mkdir()
    make_sr_weights(wdir)
    monkeypatch.setattr(import_basicsr()[1], "forward", allocate_too_much)  # SRVGGNetCompact
    rc = main(["prepare-sr", str(world["data"]), "--out", str(tmp_path / "PALM"), "--upscaler", "vgg-x4",
               "--weights-dir", str(wdir), "--input-size", "64"])
    line = one_error_line(capsys)
    assert rc == 2 and "vgg-x4: upscaling a" in line and "lower --tile (the upscaler's tile size, now off" in line


def test_bicubic_out_of_memory(monkeypatch):
    import cv2
    import numpy as np

    from twostage.sr.upscale import make_upscaler

    def no_memory(*_, **__):
        raise MemoryError("Unable to allocate")

    monkeypatch.setattr(cv2, "resize", no_memory)
    with pytest.raises(TwostageError, match=r"out of memory in bicubic: upscaling a 7x5 crop x4 on cpu"):
        make_upscaler("bicubic", 4)(np.zeros((5, 7), np.uint8))


# --------------------------------------------------------------------------- training

def tiny(data: Path, out: Path, *extra: str, epochs: int = 2):
    return load_config("global", overrides=[*TINY, *extra], data=str(data), out=str(out), epochs=epochs,
                       batch_size=2, input_size=64, workers=0, device="cpu")


def test_train_input_cache_out_of_memory(world, tmp_path, capsys):
    """A real allocation failure while the training-input cache is built (input size 2^20)."""
    rc = main(["train", "--stage", "global", "--data", str(world["data"]), "--out", str(tmp_path / "run"),
               "--epochs", "1", "--input-size", str(HUGE), "--workers", "0", "--batch-size", "2",
               *(a for kv in TINY[:-1] for a in ("--set", kv)), "--set", f"data.cache={tmp_path / 'cache'}"])
    line = one_error_line(capsys)
    assert rc == 2 and f"out of memory in preparing the training input (at input size {HUGE}" in line
    assert "lower --input-size" in line
    assert not (tmp_path / "run" / "last.pt").exists()
    assert not [p for p in (tmp_path / "cache").glob("*") if (p / "meta.json").exists()]  # no half cache


def test_train_step_out_of_memory(world, tmp_path, monkeypatch):
    """An allocation failure in a training step (here in making the batch on the device) names
    the epoch, the step and what to lower."""
    from twostage.train import loop, train

    def no_memory(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop, "make_batch", no_memory)
    with pytest.raises(TwostageError, match=r"out of memory in training \(epoch 1/1, step 1/\d+: batches of 2 at "
                                            r"64x64 on cpu\); lower --batch-size \(now 2\) or --input-size"):
        train(tiny(world["data"], tmp_path / "run", epochs=1))


def test_non_finite_loss_at_the_first_step(world, tmp_path):
    """No patching: a normalisation std of 1e-45 makes the inputs infinite, the loss NaN."""
    from twostage.train import train

    run = tmp_path / "run"
    with pytest.raises(TwostageError, match=r"non-finite loss \(nan\) at epoch 1/2, step 1/\d+, before its update; "
                                            r"last good checkpoint: none \(no epoch has finished\)"):
        train(tiny(world["data"], run, "model.std=[1e-45]"))
    assert not (run / "last.pt").exists()


def test_non_finite_loss_names_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    """NaN at the first step of epoch 2: the error names last.pt of epoch 1, which is still
    epoch 1's file (the NaN step never updated the weights)."""
    from twostage.train import loop, train

    real, calls = loop.bce_dice_loss, []

    def nan_on_second_call(logits, *args):  # 2 training images, batch 2: one step per epoch
        calls.append(1)
        loss = real(logits, *args)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "bce_dice_loss", nan_on_second_call)
    run = tmp_path / "run"
    with pytest.raises(TwostageError, match=r"non-finite loss \(nan\) at epoch 2/2, step 1/1, before its update") as e:
        train(tiny(world["data"], run))
    assert f"last good checkpoint: {run / 'last.pt'} (after epoch 1)" in str(e.value)
    assert load_checkpoint(run / "last.pt")["meta"]["epoch"] == 1


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x)


def test_amp_skipped_steps_are_counted():
    """A real GradScaler (its CPU form): a step whose gradients overflow is skipped and counted,
    the weights are unchanged and the scale halves; the next step updates."""
    from types import SimpleNamespace

    import numpy as np

    from twostage.train.augment import IDENTITY
    from twostage.train.distributed import Dist
    from twostage.train.loop import SKIPPED, UPDATED, Fit, train_step

    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    fit = Fit(net, net, torch.device("cpu"), None, None, opt, sched, torch.amp.GradScaler("cpu", init_scale=1024.0),
               False, False, None)
    cfg = SimpleNamespace(model=SimpleNamespace(in_channels=3, input_size=8), data=SimpleNamespace(patch=None),
                          loss=SimpleNamespace(bce=1.0, dice=1.0, batch_dice=False),
                          optim=SimpleNamespace(grad_clip=1.0))
    meta = {"normalization": {"mean": [0.5], "std": [0.25]}}
    masks = (torch.rand(2, 2, 8, 8).round() * 255).to(torch.uint8)
    batch = {"image": torch.randint(0, 255, (2, 8, 8), dtype=torch.uint8), "size": torch.tensor([[8, 8]] * 2),
             "data": masks.reshape(-1),  # every class a full 8x8 slab, back to back
             "table": torch.tensor([[[64 * (2 * b + c), 0, 8, 0, 8] for c in range(2)] for b in range(2)]),
             "rect": torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2, dtype=torch.float64),
             "params": torch.from_numpy(np.stack([IDENTITY] * 2)), "valid": torch.ones(2, 2)}
    hook = net.conv.weight.register_hook(lambda g: g * float("inf"))
    before = net.conv.weight.detach().clone()
    loss, did = train_step(cfg, fit, batch, meta, Dist())
    assert did == SKIPPED and torch.isfinite(loss) and torch.equal(net.conv.weight, before)
    assert fit.scaler.get_scale() == 512.0
    hook.remove()
    assert train_step(cfg, fit, batch, meta, Dist())[1] == UPDATED
    assert not torch.equal(net.conv.weight, before)


def test_train_reports_skipped_steps_column(world, tmp_path):
    """Every epoch's metrics.csv row says how many updates AMP skipped (0 without AMP)."""
    import csv

    from twostage.train import train

    run = train(tiny(world["data"], tmp_path / "run", epochs=1))
    with open(run / "metrics.csv", newline="") as f:
        assert [r["skipped_steps"] for r in csv.DictReader(f)] == ["0"]


# ----------------------------------------------------------------- on a CUDA machine (benchmarks/gpu_check.py runs `-k cuda`)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_out_of_memory_in_infer(world, tmp_path, capsys):
    """The device's own OutOfMemoryError (a 12 TiB input), as one line naming the step."""
    out = tmp_path / "out.csv"
    rc = main(["infer", str(world["data"]), "--split", "train", "--global", str(world["huge_global"]),
               "--out", str(out), "--device", "cuda"])
    line = one_error_line(capsys)
    assert rc == 2 and "out of memory in infer: the global model (1 image(s) of 96x96 on cuda" in line
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_skipped_steps(world, tmp_path, monkeypatch):
    """A real AMP run on CUDA: an update whose gradients overflow is skipped by GradScaler and counted."""
    import csv

    from twostage.train import loop, train

    real, calls = loop.bce_dice_loss, []

    def overflow_first_gradient(logits, *args):
        loss = real(logits, *args)
        calls.append(1)
        if len(calls) == 1:
            logits.register_hook(lambda g: g * float("inf"))
        return loss

    monkeypatch.setattr(loop, "bce_dice_loss", overflow_first_gradient)
    run = train(load_config("global", overrides=[*TINY, "train.amp=true"], data=str(world["data"]),
                            out=str(tmp_path / "run"), epochs=1, batch_size=2, input_size=64, workers=0,
                            device="cuda"))
    with open(run / "metrics.csv", newline="") as f:
        assert [r["skipped_steps"] for r in csv.DictReader(f)] == ["1"]
