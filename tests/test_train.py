"""Training: one batch overfits, split grouped by ID, exact resume, palm set checks, DDP."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bicubic_palm_set

from twostage.checkpoint import load_checkpoint
from twostage.cli import main
from twostage.config import load_config
from twostage.errors import TwostageError
from twostage.models import Predictor, build_model, normalize
from twostage.train import (
    GlobalDataset,
    bce_dice_loss,
    collate,
    load_or_create_split,
    make_batch,
    make_split,
    set_head_prior,
    train,
)

TINY = ["model.arch=Unet", "model.encoder=resnet18", "model.encoder_weights=none",
        "model.kwargs={encoder_depth: 3, decoder_channels: [16, 8, 8]}",
        "data.folds=4", "data.preload=true"]


@pytest.fixture(scope="module")
def data(make_phantoms) -> Path:
    return make_phantoms("train", n=8, size=128, seed=5)


@pytest.fixture(scope="module")
def palm_data(data) -> Path:
    return bicubic_palm_set(data)


def tiny(stage: str, data: Path, out: Path, *extra: str, epochs: int = 2):
    return load_config(stage, overrides=[*TINY, *extra], data=str(data), out=str(out), epochs=epochs,
                       batch_size=2, input_size=64, workers=0, device="cpu")


def test_one_batch_overfits(data, tmp_path):
    torch.manual_seed(0)
    cfg = tiny("global", data, data.parent / "unused")
    from twostage.data.layout import find_samples

    ds = GlobalDataset(cfg, find_samples(data)[:2], None, augment=False)
    ds.attach_cache(tmp_path / "cache")
    batch = make_batch(collate([ds[0], ds[1]]), (64, 64), torch.device("cpu"))
    images, masks = batch.images, batch.masks
    model = build_model("Unet", "resnet18", 29, encoder_depth=3, decoder_channels=[32, 16, 16])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = normalize(images, [0.5] * 3, [0.25] * 3, 3)
    losses = []
    for _ in range(200):  # stops as soon as the loss has halved
        loss = bce_dice_loss(model(x), masks, 1.0, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.5 * losses[0]:
            break
    assert losses[-1] < 0.5 * losses[0], losses[::20]


@pytest.mark.parametrize("arch,kwargs", [("Unet", {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}),
                                         ("FPN", {"encoder_depth": 3})])
def test_head_prior_sets_the_initial_probability(arch, kwargs):
    model = build_model(arch, "resnet18", 4, **kwargs).eval()
    set_head_prior(model, 0.02)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.zeros(1, 3, 32, 32)))
    assert abs(p.mean().item() - 0.02) < 0.015


def test_split_keeps_both_hands_together_and_is_reused(tmp_path):
    ids = [f"ID{i:03d}" for i in range(10) for _ in range(2)] + ["ID999"]
    a = make_split(ids, 4, seed=1)
    assert a == make_split(list(reversed(ids)), 4, seed=1)  # order-independent, deterministic
    sizes = np.bincount([a[i] for i in ids], minlength=4)
    assert sizes.max() - sizes.min() <= 2
    path = tmp_path / "split.json"
    assert load_or_create_split(path, ids, 4, seed=1) == a
    assert load_or_create_split(path, ids, 4, seed=99) == a  # the file wins once it exists
    with pytest.raises(TwostageError, match="not in the split file"):
        load_or_create_split(path, ids + ["ID500"], 4, seed=1)
    with pytest.raises(TwostageError, match="made for 4 folds"):
        load_or_create_split(path, ids, 5, seed=1)


def test_global_run_folder_and_checkpoints(data, tmp_path):
    run = train(tiny("global", data, tmp_path / "run", "train.val_every=2"))
    for name in ("config.yaml", "split.json", "metrics.csv", "best.pt", "last.pt", "val.json"):
        assert (run / name).is_file(), name
    import csv

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0]["overall"] == "" and float(rows[1]["overall"]) > 0  # validated at epoch 2 only
    assert "dice/Lunate" in rows[0] and rows[1]["dice/Lunate"] != ""
    best = load_checkpoint(run / "best.pt", expect_stage="global")
    assert "optimizer" not in best and best["meta"]["input_size"] == [64, 64]
    last = torch.load(run / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng", "best"} <= set(last)
    p = Predictor.from_checkpoint(run)
    img = torch.randint(0, 256, (1, 128, 128), dtype=torch.uint8)
    assert p.probs(img).shape == (1, 29, 128, 128)
    # a finished run is neither restarted nor silently extended
    with pytest.raises(TwostageError, match="holds a run already"):
        train(tiny("global", data, tmp_path / "run", "train.val_every=2"))
    with pytest.raises(TwostageError, match="run finished"):
        train(tiny("global", data, tmp_path / "run", "train.val_every=2"), resume=True)
    with pytest.raises(TwostageError, match="changed config.*train.epochs: 2 -> 4"):
        train(tiny("global", data, tmp_path / "run", "train.val_every=2", epochs=4), resume=True)


def test_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    full = train(tiny("global", data, tmp_path / "a", epochs=3))
    with pytest.raises(TwostageError, match="no checkpoint to resume"):
        train(tiny("global", data, tmp_path / "b", epochs=3), resume=True)
    train(tiny("global", data, tmp_path / "b", "train.stop_at_epoch=1", epochs=3))
    assert load_checkpoint(tmp_path / "b" / "last.pt")["meta"]["epoch"] == 1
    resumed = train(tiny("global", data, tmp_path / "b", epochs=3), resume=True)
    a = load_checkpoint(full / "last.pt")["state_dict"]
    b = load_checkpoint(resumed / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (full / "metrics.csv").read_text().count("\n") == (resumed / "metrics.csv").read_text().count("\n")


def test_worker_count_does_not_change_the_weights(data, tmp_path, caplog):
    """Augmentation is seeded per (epoch, item), so workers (persistent across epochs, capped
    at the CPU count) only change speed."""
    import logging

    a = train(tiny("global", data, tmp_path / "a", "data.preload=false", epochs=2))
    cfg = tiny("global", data, tmp_path / "b", "data.preload=false", epochs=2)
    cfg.train.workers = 64
    with caplog.at_level(logging.INFO):
        b = train(cfg)
    assert "DataLoader worker(s) (train.workers=64)" in caplog.text
    sa, sb = (load_checkpoint(r / "last.pt")["state_dict"] for r in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_palm_refuses_a_dataset_without_palm_set_record(data, tmp_path):
    with pytest.raises(TwostageError, match="palmset.json"):
        train(tiny("palm", data, tmp_path / "run"))


def test_palm_training_records_box_rule_and_sr(palm_data, tmp_path):
    run = train(tiny("palm", palm_data, tmp_path / "run", "data.classes=[Capitate, Lunate]", epochs=1))
    meta = load_checkpoint(run / "best.pt", expect_stage="palm")["meta"]
    assert meta["classes"] == ["Capitate", "Lunate"]
    assert meta["palm_set"]["upscaler"] == "bicubic" and meta["palm_set"]["scale"] == 2
    assert set(meta["box_rule"]) >= {"margin", "side_min", "side_max"}
    rule = meta["box_rule"]  # prepare-sr's rule carries the fallback box and side range of the training boxes
    assert len(rule["fallback"]) == 3 and 0 < rule["side_min"] <= rule["side_max"]
    assert meta["metrics"]["carpal_mean"] is not None


def test_cli_train_runs(data, tmp_path, capsys):
    args = ["train", "--stage", "global", "--data", str(data), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--batch-size", "2", "--input-size", "64", "--workers", "0", "--device", "cpu"]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    assert "run folder" in capsys.readouterr().out
    assert main(args + ["--resume"]) != 0
    assert "run finished" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_cpu_processes(data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "twostage", "train", "--stage", "global", "--data", str(data), "--out", str(out),
           "--epochs", "2", "--batch-size", "2", "--input-size", "64", "--workers", "0", "--device", "cpu"]
    for s in TINY + ["train.threads=1"]:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and its worker processes
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("run folder") == 1  # rank 0 only
    ckpt = load_checkpoint(out / "last.pt", expect_stage="global")
    assert ckpt["meta"]["epoch"] == 2
    assert Predictor.from_checkpoint(out / "best.pt").classes[0] == "finger-1"


def test_class_weights_reweight_both_loss_terms():
    from twostage.train.loss import loss_weights

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=g)
    target = (torch.rand(2, 3, 16, 16, generator=g) > 0.7).float()
    target[:, 2] = 0  # channel 2 all wrong-ish: its loss is the largest
    logits[:, 2] = 3.0
    plain = bce_dice_loss(logits, target, 1.0, 1.0)
    torch.testing.assert_close(bce_dice_loss(logits, target, 1.0, 1.0, torch.ones(3)), plain)
    torch.testing.assert_close(bce_dice_loss(logits, target, 1.0, 1.0, torch.full((3,), 5.0)), plain)  # ratios only
    assert bce_dice_loss(logits, target, 1.0, 1.0, torch.tensor([1.0, 1.0, 4.0])) > plain
    assert bce_dice_loss(logits, target, 1.0, 1.0, torch.tensor([1.0, 1.0, 0.0])) < plain

    cfg = load_config("demo-palm", overrides=["loss.class_weights={Pisiform: 3}"])
    w = loss_weights(cfg)
    assert w[cfg.classes.index("Pisiform")] == 3 and w.sum() == len(cfg.classes) + 2
    assert loss_weights(load_config("palm")) is None  # the real palm config: all classes alike
    shipped = loss_weights(load_config("demo-palm"))  # the demo's: the two overlapping carpals doubled
    assert [c for c, v in zip(load_config("demo-palm").classes, shipped) if v == 2] == ["Triquetrum", "Pisiform"]
    for bad, match in (("{Radius: 2}", "not among this stage's classes"), ("{Pisiform: -1}", "finite weights")):
        with pytest.raises(TwostageError, match=match):
            load_config("demo-palm", overrides=[f"loss.class_weights={bad}"])
