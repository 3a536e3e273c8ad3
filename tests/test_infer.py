"""`twostage infer`: the CSV it writes, the fused chain's coordinate mapping, errors.

Models are tiny random-initialised smp networks saved as real checkpoints; the data is
`twostage synth` phantoms at 128–256 px.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_cli
from reference import source_to_crop

from twostage.box import BoxRule
from twostage.checkpoint import save_checkpoint
from twostage.classes import CLASSES, PALM_CLASSES, PALM_INDICES
from twostage.cli import main
from twostage.data.annotations import rasterize, read_annotations
from twostage.data.layout import find_samples
from twostage.data.synth import synthesize
from twostage.errors import TwostageError
from twostage.evaluation.score import score_csv
from twostage.inference.chain import ChainOptions, TwoStage
from twostage.inference.infer import infer
from twostage.inference.probs import read_probs
from twostage.io.images import read_image
from twostage.metrics import dice_per_class
from twostage.models import build_model
from twostage.pretrained import default_normalization
from twostage.rle import decode, read_csv
from twostage.sr.upscale import make_upscaler

TINY = {"arch": "Unet", "encoder": "tu-mobilenetv3_small_050", "in_channels": 3,
        "kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}


def tiny_checkpoint(path: Path, stage: str, classes=CLASSES, input_size: int = 64, seed: int = 0,
                    palm_set: dict | None = None, box_rule: BoxRule | None = None) -> Path:
    """A random-initialised tiny network saved as a real twostage checkpoint."""
    torch.manual_seed(seed)
    net = build_model(TINY["arch"], TINY["encoder"], len(classes), TINY["in_channels"], **TINY["kwargs"])
    meta = {"stage": stage, "classes": list(classes), "model": TINY, "input_size": input_size,
            "normalization": default_normalization(None)}
    if stage == "palm":
        rule = box_rule or BoxRule(margin=0.15, side_min=0.1, side_max=0.6, fallback=(0.5, 0.6, 0.3))
        meta["box_rule"] = rule.to_dict()
        meta["palm_set"] = palm_set or {**make_upscaler("bicubic", 4).record(), "context": 1.5}
    return save_checkpoint(path, net.state_dict(), meta)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A phantom dataset (3 annotated train images, 3 test images) and tiny global/palm checkpoints."""
    base = tmp_path_factory.mktemp("infer")
    root = synthesize(base / "DATA", n=3, size=128, seed=1, test_n=3)
    return {
        "root": root,
        "global": tiny_checkpoint(base / "global.pt", "global"),
        "palm": tiny_checkpoint(base / "palm.pt", "palm", classes=PALM_CLASSES, seed=1),
        "base": base,
    }


def _rows(csv_path: Path) -> list[tuple[str, str]]:
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "image_name,class,rle"
    return [tuple(line.split(",")[:2]) for line in lines[1:]]


def test_global_only_csv_rows_in_order_and_scorable(setup, tmp_path):
    out = tmp_path / "global.csv"
    summary = infer(setup["root"], setup["global"], out, split="train")
    samples = find_samples(setup["root"], "train")
    assert summary.images == 3 and not summary.fused and not summary.skipped
    assert _rows(out) == [(s.name, c) for s in samples for c in CLASSES]
    report = score_csv(out, setup["root"])
    assert report.n_images == 3 and 0 <= report.overall <= 1
    # a dataset root means its test split
    out_test = tmp_path / "test.csv"
    infer(setup["root"], setup["global"], out_test)
    assert [n for n, _ in _rows(out_test)[::29]] == [s.name for s in find_samples(setup["root"], "test")]


def test_fused_cli_end_to_end(setup, tmp_path, capsys):
    out = tmp_path / "fused.csv"
    thr = tmp_path / "thr.yaml"
    thr.write_text("default: 0.5\nLunate: 0.45\n")
    probs_dir = tmp_path / "probs"
    rc = main(["infer", str(setup["root"]), "--global", str(setup["global"]), "--palm", str(setup["palm"]),
               "--fuse", "--out", str(out), "--tta", "hflip", "--thresholds", str(thr),
               "--save-probs", str(probs_dir), "--split", "train"])
    assert rc == 0, capsys.readouterr().err
    assert "fused" in capsys.readouterr().out
    samples = find_samples(setup["root"], "train")
    assert _rows(out) == [(s.name, c) for s in samples for c in CLASSES]
    classes, p = read_probs(probs_dir / (Path(samples[0].name).stem + ".npz"))
    assert classes == list(CLASSES) and p.shape == (29, 128, 128) and 0 <= p.min() <= p.max() <= 1
    # the saved probabilities reproduce the CSV up to quantisation
    rles = read_csv(out)[samples[0].name]
    mask = decode(rles["Radius"], (128, 128)).astype(bool)
    pr = p[CLASSES.index("Radius")]
    assert ((pr > 0.5 + 1 / 255) <= mask).all() and (mask <= (pr > 0.5 - 1 / 255)).all()


def test_fusion_changes_only_palm_classes_inside_box(setup, tmp_path):
    g_csv, f_csv = tmp_path / "g.csv", tmp_path / "f.csv"
    infer(setup["root"], setup["global"], g_csv, split="train")
    infer(setup["root"], setup["global"], f_csv, palm_ckpt=setup["palm"], fuse=True, split="train",
          fuse_weights={"default": 1.0})
    g, f = read_csv(g_csv), read_csv(f_csv)
    for name in g:
        for c in CLASSES:
            if c not in PALM_CLASSES:
                assert g[name][c] == f[name][c]
    assert any(g[n][c] != f[n][c] for n in g for c in PALM_CLASSES)
    # weight 0 for every palm class: identical to the global-only CSV
    z_csv = tmp_path / "z.csv"
    infer(setup["root"], setup["global"], z_csv, palm_ckpt=setup["palm"], fuse=True, split="train",
          fuse_weights=0.0)
    assert z_csv.read_bytes() == g_csv.read_bytes()


class OraclePalm:
    """A 'perfect' palm network: returns ±20 logits of the ground-truth carpal masks of the
    crop, computed independently by the test (crop + nearest upscale of the GT masks), after
    checking that the image it was given is the expected upscaled source crop."""

    window = None  # a whole-image model

    def __init__(self, expected_crop: np.ndarray, crop_masks: np.ndarray):
        self.expected_crop = torch.from_numpy(expected_crop)
        self.logits = torch.from_numpy(crop_masks).float()[None] * 40 - 20
        self.calls = 0

    def native_probs(self, images: torch.Tensor, tta: bool = False, fp16: bool = False, **kw) -> torch.Tensor:
        self.calls += 1
        assert torch.equal(images[0].cpu(), self.expected_crop), "palm model fed the wrong crop"
        return torch.sigmoid(self.logits)


@pytest.mark.parametrize("palm_resize", ["bilinear", "area"])
def test_perfect_palm_model_gives_carpal_dice_one(setup, tmp_path, palm_resize):
    root = synthesize(tmp_path / "D", n=1, size=256, seed=3)
    sample = find_samples(root, "train")[0]
    image = read_image(sample.image_path)
    gt = rasterize(read_annotations(sample.json_path), image.shape)
    carpals = list(PALM_INDICES)
    # global prediction: every class right, except that each carpal channel holds the union of
    # all carpals (the box is right, the carpals are not separated)
    probs = torch.from_numpy(gt).float()
    probs[carpals] = probs[carpals].amax(0) * 0.9
    before = dice_per_class((probs > 0.5).numpy()[carpals], gt[carpals])
    assert before.mean() < 0.5

    chain = TwoStage.load(setup["global"], setup["palm"], ChainOptions(palm_resize=palm_resize, fuse_weights=1.0, feather=0.0))
    stage = chain.palm
    box = stage.boxes(probs[None], [sample.name])[0]
    ys, xs = np.nonzero(gt[carpals].any(0))
    assert box.x0 <= xs.min() and xs.max() < box.x0 + box.side  # the box holds every carpal
    assert box.y0 <= ys.min() and ys.max() < box.y0 + box.side
    # the same probabilities at a global model's resolution give (almost) the same box
    coarse = F.interpolate(probs[None], size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    coarse = stage.boxes(coarse, [sample.name], image.shape)[0]
    assert abs(coarse.x0 - box.x0) <= 4 and abs(coarse.y0 - box.y0) <= 4 and abs(coarse.side - box.side) <= 8
    src_crop = image[box.y0:box.y0 + box.side, box.x0:box.x0 + box.side]
    expected = cv2.resize(src_crop, (box.side * 4, box.side * 4), interpolation=cv2.INTER_CUBIC)
    stage.predictor = OraclePalm(expected, source_to_crop(gt[carpals], box, 4))

    masks, _, region, _ = chain.segment(probs, image, box)
    after = dice_per_class(masks.numpy(), gt)
    assert stage.predictor.calls == 1 and region.shape == (len(carpals), box.side, box.side)
    np.testing.assert_array_equal(after, np.ones(len(CLASSES)))


def test_shards_concatenate_to_the_full_csv(setup, tmp_path):
    full = tmp_path / "full.csv"
    infer(setup["root"], setup["global"], full, split="train")
    parts = []
    for i in range(2):
        part = tmp_path / f"s{i}.csv"
        infer(setup["root"], setup["global"], part, split="train", shard=f"{i}/2")
        parts.append(part.read_text().splitlines()[1:])
    assert full.read_text().splitlines()[1:] == parts[0] + parts[1]
    assert len(parts[0]) and len(parts[1])


@pytest.fixture
def with_corrupt(setup, tmp_path) -> Path:
    """A copy of the test images plus one corrupt PNG."""
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(setup["root"] / "test" / "DCM", folder)
    (folder / "ID999").mkdir()
    (folder / "ID999" / "image_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def test_corrupt_image_stops_run_without_csv(setup, with_corrupt, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    out.write_text("previous\n")
    rc = main(["infer", str(with_corrupt), "--global", str(setup["global"]), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "image_bad.png" in err
    assert out.read_text() == "previous\n"
    assert not list(tmp_path.glob(".sub.csv*"))  # no temporary left behind


def test_skip_bad_writes_empty_masks(setup, with_corrupt, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    rc = main(["infer", str(with_corrupt), "--global", str(setup["global"]), "--out", str(out), "--skip-bad"])
    assert rc == 0
    assert "image_bad.png" in capsys.readouterr().out
    rows = read_csv(out)
    assert len(rows) == 4 and all(v == "" for v in rows["image_bad.png"].values())
    assert len(rows["image_bad.png"]) == 29


def test_user_errors(setup, tmp_path):
    out = tmp_path / "x.csv"
    with pytest.raises(TwostageError, match="--palm"):
        infer(setup["root"], setup["global"], out, fuse=True)
    with pytest.raises(TwostageError, match="expected a 'global'"):
        infer(setup["root"], setup["palm"], out)
    with pytest.raises(TwostageError, match="expected a 'palm'"):
        infer(setup["root"], setup["global"], out, palm_ckpt=setup["global"], fuse=True)
    with pytest.raises(TwostageError, match="fp16"):
        infer(setup["root"], setup["global"], out, fp16=True)
    with pytest.raises(TwostageError, match="shard"):
        infer(setup["root"], setup["global"], out, shard="2/2")
    few = tiny_checkpoint(tmp_path / "few.pt", "global", classes=CLASSES[:5])
    with pytest.raises(TwostageError, match="29"):
        infer(setup["root"], few, out)
    assert not out.exists()


def test_recorded_upscaler_is_enforced(setup, tmp_path):
    out = tmp_path / "x.csv"
    wrong = tiny_checkpoint(tmp_path / "p2.pt", "palm", classes=PALM_CLASSES,
                            palm_set={"upscaler": "bicubic", "scale": 2, "weight_sha256": "0" * 64})
    with pytest.raises(TwostageError, match="never substituted"):
        infer(setup["root"], setup["global"], out, palm_ckpt=wrong, fuse=True)
    sr = tiny_checkpoint(tmp_path / "p3.pt", "palm", classes=PALM_CLASSES,
                         palm_set={"upscaler": "RealESRGAN_x4plus", "scale": 4, "weight_sha256": "0" * 64})
    with pytest.raises(TwostageError, match="RealESRGAN_x4plus"):
        infer(setup["root"], setup["global"], out, palm_ckpt=sr, fuse=True,
              weights_dir=tmp_path / "no-weights")
    assert not out.exists()


def test_module_entry_point_and_fuse_without_palm(setup, tmp_path):
    out = tmp_path / "m.csv"
    cmd = ["-q", "infer", setup["root"], "--global", setup["global"], "--out", out]
    r = run_cli(*cmd, "--fuse", timeout=120)
    assert_one_line_error(r, "--palm", rc=2)
    assert not out.exists()
    r = run_cli(*cmd, "--batch-size", "2", timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(read_csv(out)) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_csv_matches_cpu(setup, tmp_path):
    cpu, gpu = tmp_path / "cpu.csv", tmp_path / "gpu.csv"
    kw = dict(palm_ckpt=setup["palm"], fuse=True, split="train")
    infer(setup["root"], setup["global"], cpu, **kw)
    infer(setup["root"], setup["global"], gpu, device="cuda", **kw)
    assert _rows(cpu) == _rows(gpu)
    a, b = read_csv(cpu), read_csv(gpu)
    flips = [(decode(a[n][c], (128, 128)) != decode(b[n][c], (128, 128))).mean() for n in a for c in CLASSES]
    # a random network sits near p = 0.5, so float differences may flip a few pixels
    assert float(np.mean(flips)) < 0.01
