"""Tile-sparse thresholded upsampling against the dense upsample it replaces, and the infer
chain built on it against the dense chain (Predictor.probs → fuse → binarize)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from test_infer import tiny_checkpoint

from twostage.classes import CLASSES, PALM_INDICES
from twostage.data.annotations import rasterize
from twostage.data.layout import find_samples
from twostage.data.synth import render_hand, synthesize
from twostage.fusion import fuse, fuse_weights, thresholds
from twostage.inference import chain as chain_module
from twostage.inference import upsample
from twostage.inference.chain import TwoStage
from twostage.inference.infer import infer
from twostage.io.images import read_image
from twostage.models import Predictor, resize_images
from twostage.rle import decode, encode_masks, read_csv

TIE = 1e-5  # float-rounding ties: the sparse and dense upsample differ by ~1e-6 at most


def structured_probs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(29, n, n) network-size probabilities of a hand phantom: blurred bones, zero elsewhere."""
    _, anns = render_hand(np.random.default_rng(seed), size)
    gt = rasterize(anns, (size, size)).astype(np.float32)
    return torch.from_numpy(np.stack([
        cv2.resize(cv2.GaussianBlur(m, (9, 9), 0), (n, n), interpolation=cv2.INTER_AREA) for m in gt]))


def assert_equal_but_ties(masks: torch.Tensor, dense: torch.Tensor, thr: torch.Tensor) -> None:
    differ = masks != (dense > thr[:, None, None])
    tie = (dense - thr[:, None, None]).abs() < TIE
    assert not (differ & ~tie).any(), f"{int((differ & ~tie).sum())} pixels differ away from a tie"


@pytest.mark.parametrize("n, size, tile", [(48, 200, 16), (37, 256, 64), (64, 131, 32), (64, 64, 16), (8, 40, 64)])
def test_threshold_upsample_equals_dense(n, size, tile, monkeypatch):
    monkeypatch.setattr(upsample, "CHUNK", 5)  # several batched steps
    probs = structured_probs(n, 2 * size)
    thr = torch.linspace(0.1, 0.9, len(CLASSES))
    masks, rows = upsample.threshold_upsample(probs, (size, size + 7), thr, tile=tile)
    dense = resize_images(probs[None], (size, size + 7))[0]
    assert masks.dtype == torch.bool and masks.shape == (len(CLASSES), size, size + 7)
    assert masks.is_contiguous()
    assert_equal_but_ties(masks, dense, thr)
    assert masks.any() and not masks.all()
    # the row hint covers every foreground row, and the RLE that skips the others is the same
    assert rows.shape == (len(CLASSES), size) and (masks.any(2) <= rows).all() and not rows.all()
    assert encode_masks(masks, rows=rows) == encode_masks(masks)


def test_sparse_path_computes_few_tiles_and_downsampling_is_dense(monkeypatch):
    probs = structured_probs(160, 512)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.shape[0]) or real_bmm(a, b))
    thr = thresholds()
    masks, _ = upsample.threshold_upsample(probs, (512, 512), thr, tile=32)
    assert_equal_but_ties(masks, resize_images(probs[None], (512, 512))[0], thr)
    tiles = len(CLASSES) * (512 // 32) ** 2
    assert 0 < sum(calls) / 2 < 0.25 * tiles  # bones cover a small part of the image
    small, rows = upsample.threshold_upsample(probs, (100, 90), thr)  # a downsample: the dense rule
    assert torch.equal(small, resize_images(probs[None], (100, 90))[0] > thr[:, None, None]) and rows is None


def test_upsample_region_equals_the_dense_crop():
    probs = structured_probs(40, 256)
    dense = resize_images(probs[None], (129, 200))[0]
    region = upsample.upsample_region(probs, (129, 200), 17, 150, 100, 50)
    torch.testing.assert_close(region, dense[:, 17:117, 150:200], atol=TIE, rtol=0)
    with pytest.raises(ValueError, match="outside"):
        upsample.upsample_region(probs, (129, 200), 100, 150, 100, 50)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("upsample")
    root = synthesize(base / "DATA", n=2, size=160, seed=4)
    return {"root": root, "global": tiny_checkpoint(base / "g.pt", "global", input_size=64),
            "palm": tiny_checkpoint(base / "p.pt", "palm", classes=[CLASSES[i] for i in PALM_INDICES], seed=2)}


@pytest.mark.parametrize("box_rows", [64, 7])
def test_infer_csv_equals_the_dense_chain(chain, tmp_path, box_rows, monkeypatch):
    """infer (network-size probabilities, tile-sparse upsample, box-only fusion in row chunks)
    gives the masks of the dense chain: full-size probabilities, `fuse`, `binarize`."""
    monkeypatch.setattr(chain_module, "BOX_ROWS", box_rows)
    out = tmp_path / "f.csv"
    infer(chain["root"], chain["global"], out, palm_ckpt=chain["palm"], fuse=True, split="train",
          thresholds=0.45)
    rows = read_csv(out)
    dev = torch.device("cpu")
    glob = Predictor.from_checkpoint(chain["global"], dev)
    two = TwoStage.build(chain["global"], chain["palm"], thresholds=0.45)
    palm = two.palm
    thr, w = thresholds(0.45), fuse_weights(None, palm.classes)
    for sample in find_samples(chain["root"], "train"):
        image = read_image(sample.image_path)
        x = torch.from_numpy(image)[None]
        probs = glob.probs(x)[0]
        box = palm.boxes(glob.native_probs(x), [sample.name], image.shape)[0]
        assert box.side > 7  # several row chunks when box_rows is 7
        fuse(probs, palm.probs(palm.crop_upscaled(image, box), box, dev), box, w,
             palm_channels=palm.channels)
        got = torch.from_numpy(np.stack([decode(rows[sample.name][c], image.shape) for c in CLASSES]) != 0)
        assert_equal_but_ties(got, probs, thr)
        masks, seg_box, region, hint = two.segment(glob.native_probs(x)[0], image, box)
        assert seg_box == box
        assert torch.equal(masks, got) and (masks.any(2) <= hint).all()
        rs, cs = box.slices
        torch.testing.assert_close(region, probs[list(palm.channels), rs, cs], atol=TIE, rtol=0)
