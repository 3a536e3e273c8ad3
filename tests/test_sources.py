"""Training on several data roots (labelled + pseudo-labelled): config, split, sampler, loss mask."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from twostage.checkpoint import load_checkpoint
from twostage.classes import CLASSES
from twostage.config import load_config
from twostage.data.layout import find_samples
from twostage.data.pseudo_record import PSEUDO_RECORD
from twostage.errors import TwostageError
from twostage.train import GlobalDataset, bce_dice_loss, train
from twostage.train.datasets import SeededSampler

TINY = ["model.arch=Unet", "model.encoder=resnet18", "model.encoder_weights=none",
        "model.kwargs={encoder_depth: 3, decoder_channels: [16, 8, 8]}", "data.folds=4", "data.preload=true"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    """A labelled set L and a pseudo-labelled set P (other IDs) whose first image has two
    classes dropped."""
    from twostage.data.synth import synthesize

    base = tmp_path_factory.mktemp("sources")
    labelled = synthesize(base / "L", n=8, size=128, seed=5)
    pseudo = synthesize(base / "P", n=8, size=128, seed=6)
    for sub in ("DCM", "outputs_json"):  # other people than L's (synth numbers IDs from ID001)
        for d in sorted((pseudo / "train" / sub).iterdir()):
            d.rename(d.with_name("P" + d.name))
    first = find_samples(pseudo)[0]
    record = {"format": 1, "source": {"csv": "pred.csv"}, "images": len(find_samples(pseudo)),
              "dropped_images": [], "dropped_classes": {first.rel: ["Hamate", "Radius"]}}
    (pseudo / PSEUDO_RECORD).write_text(json.dumps(record))
    return labelled, pseudo


def tiny(data, out: Path, *extra: str, epochs: int = 1):
    return load_config("global", overrides=[*TINY, *extra], data=data, out=str(out), epochs=epochs, batch_size=2,
                       input_size=64, workers=0, device="cpu")


@pytest.mark.parametrize("extra, match", [
    (["data.source_weights=[1]"], "one weight per data.root"),
    (["data.source_weights=[1, 0]"], "positive"),
    (["data.source_weights=[1, -2]"], "positive"),
    (["data.source_weights=[1, .inf]"], "data.source_weights"),
])
def test_bad_source_weights_are_one_line_errors(roots, tmp_path, extra, match):
    with pytest.raises(TwostageError, match=match):
        tiny([str(r) for r in roots], tmp_path / "run", *extra)


def test_bad_root_lists_are_refused(roots, tmp_path):
    with pytest.raises(TwostageError, match="listed twice"):
        tiny([str(roots[0]), str(roots[0])], tmp_path / "run")
    with pytest.raises(TwostageError, match="none empty"):
        tiny([], tmp_path / "run")
    with pytest.raises(TwostageError, match="palm stage trains on one"):
        load_config("palm", data=[str(r) for r in roots])


def test_only_pseudo_roots_cannot_validate(roots, tmp_path):
    other = tmp_path / "P2"
    shutil.copytree(roots[1], other)
    with pytest.raises(TwostageError, match="every root is pseudo-labelled"):
        train(tiny([str(roots[1]), str(other)], tmp_path / "run"))


def test_training_on_labelled_and_pseudo_roots(roots, tmp_path):
    labelled, pseudo = roots
    run = train(tiny([str(labelled), str(pseudo)], tmp_path / "run", "data.source_weights=[1, 0.5]"))
    meta = load_checkpoint(run / "last.pt")["meta"]
    folds = json.loads((run / "split.json").read_text())["folds"]
    l_ids = {s.id for s in find_samples(labelled)}
    assert set(folds) == l_ids  # folds are drawn over the labelled IDs only
    val_ids = {i for i, f in folds.items() if f == 0}
    assert val_ids and not val_ids & set(meta["train_ids"])
    assert {s.id for s in find_samples(pseudo)} <= set(meta["train_ids"])  # every pseudo ID trains
    assert [m["pseudo"] for m in meta["sources"]] == [False, True]
    assert [m["weight"] for m in meta["sources"]] == [1.0, 0.5]
    assert meta["sources"][0]["images"] == sum(1 for s in find_samples(labelled) if s.id not in val_ids)
    assert meta["sources"][1]["images"] == len(find_samples(pseudo))
    assert meta["sources"][1]["pseudo_source"] == {"csv": "pred.csv"}


def test_pseudo_images_of_a_validation_id_do_not_train(roots, tmp_path):
    """A pseudo-labelled image whose person ID is in the validation fold would leak it."""
    labelled, pseudo = roots
    leak = tmp_path / "P"
    shutil.copytree(pseudo, leak)
    ids = sorted({s.id for s in find_samples(labelled)})
    for sub in ("DCM", "outputs_json"):
        for i in ids:
            shutil.copytree(labelled / "train" / sub / i, leak / "train" / sub / i)
    run = train(tiny([str(labelled), str(leak)], tmp_path / "run"))
    meta = load_checkpoint(run / "last.pt")["meta"]
    val_ids = set(ids) - set(meta["train_ids"])
    assert val_ids
    n_leak = sum(1 for s in find_samples(leak) if s.id in val_ids)
    assert meta["sources"][1]["images"] == len(find_samples(leak)) - n_leak > 0


def test_dropped_pseudo_classes_are_left_out_of_the_loss(roots, tmp_path):
    labelled, pseudo = roots
    cfg = tiny([str(labelled), str(pseudo)], tmp_path / "run")
    samples = find_samples(pseudo)[:2]
    ds = GlobalDataset(cfg, samples, None, augment=False, ignored=[["Hamate", "Radius"], []])
    ds.attach_cache(tmp_path / "cache")
    valid, valid1 = (torch.from_numpy(ds[i]["valid"]) for i in (0, 1))
    assert valid.shape == (len(CLASSES),)
    assert {CLASSES[i] for i in np.flatnonzero(valid.numpy() == 0)} == {"Hamate", "Radius"}
    assert bool(valid1.all())
    logits = torch.randn(2, len(CLASSES), 16, 16, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(2, len(CLASSES), 16, 16, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    v = torch.stack([valid, valid1])
    loss = bce_dice_loss(logits, target, 1.0, 1.0, None, v)
    changed = target.clone()
    changed[0, CLASSES.index("Hamate")] = 1 - changed[0, CLASSES.index("Hamate")]
    torch.testing.assert_close(bce_dice_loss(logits, changed, 1.0, 1.0, None, v), loss)  # ignored: no effect
    assert bce_dice_loss(logits, changed, 1.0, 1.0) != bce_dice_loss(logits, target, 1.0, 1.0)
    torch.testing.assert_close(bce_dice_loss(logits, target, 1.0, 1.0, None, torch.ones(2, len(CLASSES))),
                               bce_dice_loss(logits, target, 1.0, 1.0))
    w = torch.linspace(0.5, 2, len(CLASSES))
    torch.testing.assert_close(bce_dice_loss(logits, target, 1.0, 1.0, w, torch.ones(2, len(CLASSES))),
                               bce_dice_loss(logits, target, 1.0, 1.0, w))


def test_weighted_sampler_draws_by_weight_and_splits_ranks():
    weights = [1.0] * 10 + [0.25] * 10
    s = SeededSampler(20, seed=3, weights=weights)
    counts = Counter()
    for epoch in range(300):
        s.set_epoch(epoch)
        counts.update(list(s))
    heavy, light = sum(counts[i] for i in range(10)), sum(counts[i] for i in range(10, 20))
    assert 3.4 < heavy / light < 4.6
    s.set_epoch(7)
    assert list(s) == list(s)  # the order is a function of (seed, epoch)
    ranks = [SeededSampler(20, seed=3, weights=weights, rank=r, world=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(7)
    orders = [list(r) for r in ranks]
    assert [len(o) for o in orders] == [7, 7, 7] and len({tuple(o) for o in orders}) == 3
    assert all(0 <= i < 20 for o in orders for i in o)


def test_cli_trains_on_several_roots(roots, tmp_path):
    from twostage.cli import main

    out = tmp_path / "run"
    sets = [x for kv in TINY for x in ("--set", kv)]
    assert main(["train", "--stage", "global", "--data", *map(str, roots), "--out", str(out), "--epochs", "1",
                 "--batch-size", "2", "--input-size", "64", "--workers", "0", "--device", "cpu", *sets]) == 0
    meta = load_checkpoint(out / "last.pt")["meta"]
    assert [m["root"] for m in meta["sources"]] == [str(r) for r in roots]
    assert meta["config"]["data"]["root"] == [str(r) for r in roots]


def test_batch_dice_does_not_punish_a_window_that_misses_a_bone():
    """Per-image Dice of an empty target is lowest at p = 0 everywhere; batch Dice is not, as long
    as another image of the batch holds the bone."""
    target = torch.zeros(2, 1, 8, 8)
    target[1, 0, 2:6, 2:6] = 1
    logits = torch.full((2, 1, 8, 8), -8.0)
    logits[:, 0, 2:6, 2:6] = 8.0  # predicts the bone in both images: wrong in image 0 only
    per_image = bce_dice_loss(logits, target, 0.0, 1.0)
    batch = bce_dice_loss(logits, target, 0.0, 1.0, None, None, True)
    assert float(per_image) > 0.45 and float(batch) < 0.35
    torch.testing.assert_close(bce_dice_loss(logits, target, 0.0, 1.0, None, torch.ones(2, 1), True), batch)
    masked = bce_dice_loss(logits, target, 0.0, 1.0, None, torch.tensor([[0.0], [1.0]]), True)
    assert float(masked) < 1e-3  # image 0 masked out: the prediction is right where it counts
