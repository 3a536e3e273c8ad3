"""The training-input cache (built once, reused, invalidated) and the batch made from it on
the device (same pixels as the per-item resize, augmentation seeded per item)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bicubic_palm_set

from twostage.box import crop_image
from twostage.config import load_config
from twostage.data.fixes import Fixes
from twostage.data.layout import find_samples
from twostage.data.masks import load_masks
from twostage.io.images import read_image
from twostage.models import resize_images
from twostage.train import GlobalDataset, PalmDataset, collate, load_palm_items, make_batch
from twostage.train.augment import densify
from twostage.train.datasets import EpochSampler, SeededSampler

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(make_phantoms) -> Path:
    return make_phantoms("inputs", n=6, size=160, seed=3)


@pytest.fixture(scope="module")
def palm_data(data) -> Path:
    return bicubic_palm_set(data)


def cfg_for(stage: str, data: Path, *extra: str, input_size: int = 64):
    return load_config(stage, overrides=list(extra), data=str(data), input_size=input_size, batch_size=3,
                       device="cpu", workers=0)


def samples_of(root: Path) -> list:
    return [s for s in find_samples(root) if s.json_path is not None]


def old_resize(image: np.ndarray, masks: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """What a training item was before the cache: image and all masks resized in one call."""
    img = resize_images(torch.from_numpy(image)[None, None].float(), size)[0, 0]
    msk = resize_images(torch.from_numpy(masks)[None].float() * 255.0, size)[0]
    return (img.round().clamp(0, 255).to(torch.uint8).numpy(), msk.round().clamp(0, 255).to(torch.uint8).numpy())


def test_cache_holds_the_resized_image_and_masks_exactly(data, tmp_path):
    cfg = cfg_for("global", data)
    samples = samples_of(data)
    ds = GlobalDataset(cfg, samples, None, augment=False)
    cache = ds.attach_cache(tmp_path)
    for i, s in enumerate(samples):
        image, masks = old_resize(read_image(s.image_path), load_masks(s, cfg.classes), (64, 64))
        np.testing.assert_array_equal(cache.image(i), image)
        np.testing.assert_array_equal(cache.dense_masks(i), masks)
    meta = json.loads(next(tmp_path.glob("*/meta.json")).read_text())
    assert meta["items"] == len(samples) and meta["mask_bytes"] < len(samples) * 29 * 64 * 64 / 2  # slabs, not planes


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(data, tmp_path):
    samples = samples_of(data)
    cfg = cfg_for("global", data)
    first = GlobalDataset(cfg, samples, None, augment=False).attach_cache(tmp_path).folder
    stamp = (first / "meta.json").stat().st_mtime_ns
    again = GlobalDataset(cfg, samples, None, augment=False).attach_cache(tmp_path, workers=2).folder
    assert again == first and (first / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other_size = GlobalDataset(cfg_for("global", data, input_size=96), samples, None, augment=False)
    assert other_size.attach_cache(tmp_path).folder != first
    fixes = Fixes({samples[0].rel: {"drop": [{"label": "Lunate"}]}})
    fixed = GlobalDataset(cfg, samples, fixes, augment=False).attach_cache(tmp_path)
    assert fixed.folder != first and not fixed.dense_masks(0)[cfg.classes.index("Lunate")].any()
    # an unfinished folder (no meta.json: a killed build) is rebuilt, not read
    (first / "meta.json").unlink()
    rebuilt = GlobalDataset(cfg, samples, None, augment=False).attach_cache(tmp_path)
    assert rebuilt.folder == first and (first / "meta.json").is_file()
    js = samples[1].json_path
    text = js.read_text()
    try:  # an edited annotation file gives another key
        js.write_text(text.replace('"points"', '"points" ', 1))
        assert GlobalDataset(cfg, samples, None, augment=False).attach_cache(tmp_path).folder != first
    finally:
        js.write_text(text)
    assert not list(tmp_path.glob(".*tmp*"))  # no build leftovers


def test_unwritable_cache_folder_is_one_error(data, tmp_path):
    from twostage.errors import TwostageError

    blocker = tmp_path / "file"
    blocker.write_text("")
    ds = GlobalDataset(cfg_for("global", data), samples_of(data), None, augment=False)
    with pytest.raises(TwostageError, match="data.cache"):
        ds.attach_cache(blocker / "sub")


def test_batch_without_augmentation_is_the_cached_canvas(data, tmp_path):
    ds = GlobalDataset(cfg_for("global", data), samples_of(data), None, augment=False)
    cache = ds.attach_cache(tmp_path)
    b = make_batch(collate([ds[i] for i in range(3)]), (64, 64), CPU)
    for i in range(3):
        torch.testing.assert_close(b.images[i], torch.from_numpy(np.array(cache.image(i))).float(), atol=0, rtol=0)
        torch.testing.assert_close(b.masks[i], torch.from_numpy(cache.dense_masks(i)).float() / 255, atol=1e-4, rtol=0)


def test_flip_and_photometric_switches(data, tmp_path):
    """hflip alone mirrors the batch exactly; brightness/contrast moves the image only."""
    plain = GlobalDataset(cfg_for("global", data), samples_of(data), None, augment=False)
    plain.attach_cache(tmp_path)
    ref = make_batch(collate([plain[i] for i in range(3)]), (64, 64), CPU)
    off = ["aug.clahe=0", "aug.brightness=0", "aug.affine_p=0"]
    flip = GlobalDataset(cfg_for("global", data, *off, "aug.hflip=1"), samples_of(data), None, augment=True)
    flip.attach_cache(tmp_path)
    b = make_batch(collate([flip[i] for i in range(3)]), (64, 64), CPU)
    torch.testing.assert_close(b.images, ref.images.flip(-1), atol=0, rtol=0)
    torch.testing.assert_close(b.masks, ref.masks.flip(-1), atol=1e-4, rtol=0)
    bright = GlobalDataset(cfg_for("global", data, "aug.clahe=0", "aug.brightness=1", "aug.affine_p=0", "aug.hflip=0"),
                           samples_of(data), None, augment=True)
    bright.attach_cache(tmp_path)
    b = make_batch(collate([bright[i] for i in range(3)]), (64, 64), CPU)
    assert not torch.equal(b.images, ref.images)
    torch.testing.assert_close(b.masks, ref.masks, atol=1e-4, rtol=0)
    clahe = GlobalDataset(cfg_for("global", data, "aug.clahe=1", "aug.brightness=0", "aug.affine_p=0", "aug.hflip=0"),
                          samples_of(data), None, augment=True)
    clahe.attach_cache(tmp_path)
    b = make_batch(collate([clahe[i] for i in range(3)]), (64, 64), CPU)
    assert not torch.equal(b.images, ref.images) and b.images.min() >= 0 and b.images.max() <= 255


def test_affine_moves_image_and_masks_together(data, tmp_path):
    cfg = cfg_for("global", data, "aug.clahe=0", "aug.brightness=0", "aug.affine_p=1", "aug.hflip=0",
                  "aug.rotate=10", "aug.scale=0.1", "aug.shift=0.05")
    ds = GlobalDataset(cfg, samples_of(data), None, augment=True)
    ds.attach_cache(tmp_path)
    plain = GlobalDataset(cfg, samples_of(data), None, augment=False)
    plain.attach_cache(tmp_path)
    b = make_batch(collate([ds[i] for i in range(3)]), (64, 64), CPU)
    ref = make_batch(collate([plain[i] for i in range(3)]), (64, 64), CPU)
    assert not torch.equal(b.masks, ref.masks)
    assert 0 <= b.masks.min() and b.masks.max() <= 1
    # bone area is kept within the zoom range (scale 0.9..1.1 -> area 0.81..1.21), per image
    ratio = b.masks.sum((1, 2, 3)) / ref.masks.sum((1, 2, 3))
    assert ((ratio > 0.7) & (ratio < 1.3)).all(), ratio
    # the bones stay where the image is bright: the masks are moved with the image
    inside = (b.images * b.masks.amax(1)).sum() / b.masks.amax(1).sum()
    assert inside > b.images.mean()


def test_same_seed_same_batches_whatever_the_workers(data, tmp_path):
    """Persistent workers never see set_epoch: the sampler carries the epoch."""
    cfg = cfg_for("global", data)
    ds = GlobalDataset(cfg, samples_of(data), None, augment=True)
    ds.attach_cache(tmp_path)

    def epochs(workers: int) -> list[torch.Tensor]:
        sampler = EpochSampler(SeededSampler(len(ds), seed=0))
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler, num_workers=workers,
                                             collate_fn=collate, persistent_workers=workers > 0)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for batch in loader:
                b = make_batch(batch, (64, 64), CPU)
                out += [b.images, b.masks]
        return out

    a, b = epochs(0), epochs(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[4])  # epoch 2 draws anew


def test_patch_windows_reach_past_small_images(data, tmp_path):
    cfg = cfg_for("global", data, "data.patch=192", "data.patch_scale=1.0", "data.patch_foreground=1.0")
    ds = GlobalDataset(cfg, samples_of(data), None, augment=False)
    cache = ds.attach_cache(tmp_path)
    item = ds[0]
    assert item["image"].shape == (192, 192)  # a 160² canvas, zero-padded to the window
    assert not item["image"][160:].any() and not item["image"][:, 160:].any()
    dense = torch.zeros(1, len(item["table"]), 192, 192, dtype=torch.uint8)
    densify(torch.from_numpy(item["data"]), torch.from_numpy(item["table"])[None], dense)
    np.testing.assert_array_equal(dense[0, :, :160, :160].numpy(), cache.dense_masks(0))
    assert not dense[0, :, 160:].any() and not dense[0, :, :, 160:].any()


def test_palm_items_match_the_old_crop_and_resize(palm_data, tmp_path):
    """The un-jittered box of the canvas against the box cut from the upscaled crop and resized
    (the old path): the same picture up to the two resamplings."""
    cfg = cfg_for("palm", palm_data)
    samples = samples_of(palm_data)
    items = load_palm_items(palm_data, samples)
    ds = PalmDataset(cfg, items, None, augment=False, jitter=False)
    ds.attach_cache(tmp_path)
    b = make_batch(collate([ds[i] for i in range(len(ds))]), (64, 64), CPU)
    for i, it in enumerate(items):
        image = crop_image(read_image(it.sample.image_path), it.box, it.scale)
        masks = crop_image(load_masks(it.sample, cfg.classes), it.box, it.scale)
        img, msk = old_resize(np.ascontiguousarray(image), np.ascontiguousarray(masks), (64, 64))
        assert (b.images[i] - torch.from_numpy(img).float()).abs().mean() < 3
        p, t = b.masks[i] > 0.5, torch.from_numpy(msk) > 127
        dice = 2 * (p & t).sum() / (p.sum() + t.sum())
        assert dice > 0.93, dice
    jittered = PalmDataset(cfg, items, None, augment=False, jitter=True)
    jittered.attach_cache(tmp_path)
    assert {tuple(jittered[(e, 0)]["rect"]) for e in range(4)} != {tuple(ds[0]["rect"])}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_matches_the_cpu_batch(data, palm_data, tmp_path):
    """The same collated batches made on the GPU and on the CPU (augmentation on)."""
    cuda = torch.device("cuda")
    for stage, root in (("global", data), ("palm", palm_data)):
        cfg = cfg_for(stage, root, "aug.clahe=0.5", "aug.brightness=0.5", "aug.affine_p=1", "aug.hflip=0.5")
        samples = samples_of(root)
        ds = (PalmDataset(cfg, load_palm_items(root, samples), None, augment=True, jitter=True) if stage == "palm"
              else GlobalDataset(cfg, samples, None, augment=True))
        ds.attach_cache(tmp_path)
        batch = collate([ds[i] for i in range(len(ds))])
        a, b = make_batch(batch, (64, 64), CPU), make_batch(batch, (64, 64), cuda)
        assert (a.images - b.images.cpu()).abs().gt(1).float().mean() < 0.01, stage  # rounding at .5 may flip
        torch.testing.assert_close(b.masks.cpu(), a.masks, atol=1e-3, rtol=0)


def test_workers_auto_uses_this_process_share_of_the_cores(data, monkeypatch):
    from twostage.errors import TwostageError
    from twostage.train.loop import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cfg = load_config("global", overrides=["train.workers=auto"], data=str(data))
    assert loader_workers(cfg) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 processes on this node
    assert loader_workers(cfg) == 3
    cfg.train.workers = 64
    assert loader_workers(cfg) == 4  # never more than the share
    with pytest.raises(TwostageError, match="train.workers='many': a number of processes or auto"):
        load_config("global", overrides=["train.workers=many"], data=str(data))
