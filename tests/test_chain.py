"""One chain for every command: an inference option changes `evaluate`, `visualize` and
`calibrate` exactly as it changes `infer` (they all run `chain.TwoStage`, built from the
same `cli.options` flags)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.cli import main
from twostage.data.layout import find_samples
from twostage.data.synth import synthesize
from twostage.errors import TwostageError
from twostage.evaluation.score import score_csv
from twostage.evaluation.visualize import _Predictions
from twostage.inference.chain import ChainOptions, TwoStage
from twostage.io.images import read_image
from twostage.rle import decode, read_csv

OPTIONS = {  # flag -> value; each changes the fused CSV of the tiny random models
    "thresholds": ["--thresholds", "0.3"],
    "fuse-weights": ["--fuse-weights", "1.0"],
    "tta": ["--tta", "hflip"],
    "palm-resize": ["--palm-resize", "area"],
    "feather": ["--feather", "0.4"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_checkpoint) -> dict:
    base = tmp_path_factory.mktemp("chain")
    root = synthesize(base / "DATA", n=2, size=128, seed=2)
    g, p = make_tiny_checkpoint(base / "g.pt", "global"), make_tiny_checkpoint(base / "p.pt", "palm",
                                                                              classes=PALM_CLASSES, seed=1)
    default = base / "default.csv"
    assert main(["infer", str(root), "--global", str(g), "--palm", str(p), "--fuse", "--out", str(default)]) == 0
    return {"root": root, "global": g, "palm": p, "base": base, "default": default.read_bytes()}


def _infer(setup, out, extra, fuse=True) -> bytes:
    args = ["infer", str(setup["root"]), "--global", str(setup["global"]), "--out", str(out), *extra]
    if fuse:
        args += ["--palm", str(setup["palm"]), "--fuse"]
    assert main(args) == 0
    return out.read_bytes()


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_evaluate_takes_every_inference_option_as_infer_does(setup, tmp_path, option):
    extra = OPTIONS[option]
    fused = _infer(setup, tmp_path / "infer.csv", extra)
    assert fused != setup["default"], f"{option} should change the fused CSV of these models"
    out = tmp_path / "ev"
    assert main(["evaluate", str(setup["root"]), "--global", str(setup["global"]), "--palm", str(setup["palm"]),
                 "--out", str(out), "--pictures", "0", *extra]) == 0
    assert (out / "fused.csv").read_bytes() == fused
    assert (out / "global.csv").read_bytes() == _infer(setup, tmp_path / "global.csv", extra, fuse=False)
    report = json.loads((out / "evaluation.json").read_text())
    assert report["fused"]["overall"] == pytest.approx(score_csv(tmp_path / "infer.csv", setup["root"]).overall)


@pytest.mark.parametrize("option", ["thresholds", "tta", "fuse-weights"])
def test_visualize_draws_the_masks_infer_writes(setup, tmp_path, option):
    flag, value = OPTIONS[option]
    _infer(setup, tmp_path / "infer.csv", [flag, value])
    rows = read_csv(tmp_path / "infer.csv")
    key = flag.lstrip("-").replace("-", "_")
    predict = _Predictions(global_ckpt=setup["global"], palm_ckpt=setup["palm"], fuse=True,
                           options={key: value})
    for sample in find_samples(setup["root"], "test" if (setup["root"] / "test").is_dir() else None):
        image = read_image(sample.image_path)
        masks, box = predict(sample.name, image)
        want = np.stack([decode(rows[sample.name][c], image.shape) for c in CLASSES]).astype(bool)
        np.testing.assert_array_equal(masks, want)
        assert box is not None


def test_evaluate_on_a_dataset_root_with_a_test_split_scores_train(setup, tmp_path):
    """A root with train/ and test/: evaluate needs ground truth, so it runs on train/ (it ran
    infer's default, test/, and then failed to score it against train/)."""
    root = synthesize(tmp_path / "D", n=2, size=128, seed=4, test_n=1)
    out = tmp_path / "ev"
    assert main(["evaluate", str(root), "--global", str(setup["global"]), "--palm", str(setup["palm"]),
                 "--out", str(out), "--pictures", "1"]) == 0
    names = {line.split(",")[0] for line in (out / "fused.csv").read_text().splitlines()[1:]}
    assert names == {s.name for s in find_samples(root, "train")}


def test_calibrate_default_scores_follow_the_option_as_infer_does(setup, tmp_path):
    """calibrate --tta hflip: its 'default' column is the Dice of `infer --fuse --tta hflip`."""
    out = tmp_path / "cal"
    train = setup["root"] / "train"
    assert main(["calibrate", str(train), "--global", str(setup["global"]), "--palm", str(setup["palm"]),
                 "--out", str(out), "--tta", "hflip"]) == 0
    report = json.loads((out / "calibration.json").read_text())
    assert report["tta"] == "hflip"
    csv = tmp_path / "f.csv"
    assert main(["infer", str(train), "--global", str(setup["global"]), "--palm", str(setup["palm"]), "--fuse",
                 "--tta", "hflip", "--out", str(csv)]) == 0
    scored = score_csv(csv, train)
    plain = tmp_path / "plain.csv"
    assert main(["infer", str(train), "--global", str(setup["global"]), "--palm", str(setup["palm"]), "--fuse",
                 "--out", str(plain)]) == 0
    assert score_csv(plain, train).overall != pytest.approx(scored.overall, abs=1e-9)  # the option matters
    for c in CLASSES:
        assert report["default_dice"][c] == pytest.approx(scored.value(c), abs=1e-9)


def test_calibrate_refuses_what_it_chooses(setup, tmp_path):
    with pytest.raises(TwostageError, match="chooses the thresholds"):
        from twostage.evaluation.calibrate import calibrate

        calibrate(setup["root"], setup["global"], setup["palm"], tmp_path, thresholds=0.3)


@pytest.mark.parametrize("options, match", [
    ({"tta": "vflip"}, "--tta"), ({"palm_resize": "nearest"}, "--palm-resize"),
    ({"feather": 0.7}, "feather"), ({"upscaler_tile": -1}, "--tile"), ({"device": "gpu:x"}, "not a torch device"),
])
def test_bad_options_are_one_line_errors(setup, options, match):
    with pytest.raises(TwostageError, match=match):
        TwoStage.load(setup["global"], setup["palm"], ChainOptions(**options))


def test_cli_option_errors_exit_2_without_traceback(setup, tmp_path, capsys):
    for cmd in ("infer", "evaluate", "visualize"):
        args = [cmd, str(setup["root"]), "--global", str(setup["global"]), "--palm", str(setup["palm"]),
                "--out", str(tmp_path / ("x.csv" if cmd == "infer" else cmd)), "--feather", "0.9"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "feather" in err and "Traceback" not in err
