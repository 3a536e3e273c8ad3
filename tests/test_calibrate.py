"""`twostage calibrate`: per-class fusion weights and thresholds that never lose to the defaults."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.cli import main
from twostage.data.synth import synthesize
from twostage.errors import TwostageError
from twostage.evaluation.calibrate import calibrate, parse_grid, threshold_counts
from twostage.evaluation.score import score_csv
from twostage.inference.infer import infer


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_checkpoint) -> dict:
    base = tmp_path_factory.mktemp("calibrate")
    return {"root": synthesize(base / "DATA", n=3, size=128, seed=1),
            "global": make_tiny_checkpoint(base / "g.pt", "global"),
            "palm": make_tiny_checkpoint(base / "p.pt", "palm", classes=PALM_CLASSES, seed=1)}


def test_calibrated_files_never_score_worse_than_defaults(setup, tmp_path, capsys):
    out = tmp_path / "cal"
    rc = main(["calibrate", str(setup["root"]), "--global", str(setup["global"]), "--palm", str(setup["palm"]),
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "carpal mean" in printed and "fuse_weights.yaml" in printed
    weights = yaml.safe_load((out / "fuse_weights.yaml").read_text())["fuse_weights"]
    thresholds = yaml.safe_load((out / "thresholds.yaml").read_text())["thresholds"]
    assert list(weights) == list(PALM_CLASSES) and list(thresholds) == list(CLASSES)
    report = json.loads((out / "calibration.json").read_text())
    assert report["calibrated_overall"] >= report["default_overall"]
    assert all(report["calibrated_dice"][c] >= report["default_dice"][c] for c in CLASSES)
    assert report["calibrated_overall"] > report["default_overall"]  # random models: thresholds matter

    # the files work with infer, and infer + score reproduce calibrate's own numbers exactly
    default_csv, cal_csv = tmp_path / "default.csv", tmp_path / "cal.csv"
    kw = dict(palm_ckpt=setup["palm"], fuse=True, split="train")
    infer(setup["root"], setup["global"], default_csv, **kw)
    infer(setup["root"], setup["global"], cal_csv, thresholds=out / "thresholds.yaml",
          fuse_weights=out / "fuse_weights.yaml", **kw)
    before, after = score_csv(default_csv, setup["root"]), score_csv(cal_csv, setup["root"])
    assert after.overall >= before.overall and after.carpal_mean >= before.carpal_mean
    assert before.overall == pytest.approx(report["default_overall"], abs=1e-9)
    assert after.overall == pytest.approx(report["calibrated_overall"], abs=1e-9)
    for c in CLASSES:
        assert after.value(c) == pytest.approx(report["calibrated_dice"][c], abs=1e-9)


def test_calibrate_reports_the_global_models_box_errors(setup, tmp_path):
    """The box error in the record is the chain's predicted box against the annotations' box."""
    from twostage.box import box_error, box_from_annotations
    from twostage.data.fixes import load_annotations
    from twostage.data.layout import find_samples
    from twostage.inference.chain import TwoStage
    from twostage.io.images import read_image

    r = calibrate(setup["root"], setup["global"], setup["palm"], tmp_path, threshold_grid=[0.5], holdout=False)
    chain = TwoStage.build(setup["global"], setup["palm"], calibration="none")
    expected = []
    for s in find_samples(setup["root"]):
        image = read_image(s.image_path)
        box = chain.boxes(chain.native(image[None]), [s.name], image.shape)[0]
        expected.append(box_error(box, box_from_annotations(load_annotations(s), image.shape, chain.palm.rule)))
    e = r.box_error
    assert e["n"] == 3 and e["shift_max"] == pytest.approx(max(x for x, _ in expected))
    assert e["side_mean"] == pytest.approx(sum(y for _, y in expected) / 3)
    assert json.loads((tmp_path / "calibration.json").read_text())["box_error"] == pytest.approx(e)
    assert "palm box of the global model" in r.table()


def test_grid_without_defaults_still_contains_them(setup, tmp_path):
    r = calibrate(setup["root"], setup["global"], setup["palm"], tmp_path, weight_grid=[0.0, 1.0],
                  threshold_grid=[0.3],
                  images=[Path(p).name for p in sorted((setup["root"] / "train" / "DCM").rglob("*.png"))][:1])
    assert r.weight_grid == [0.0, 0.7, 1.0] and r.threshold_grid == [0.3, 0.5] and r.n_images == 1
    assert all(r.calibrated_dice[c] >= r.default_dice[c] for c in CLASSES)
    assert set(r.fuse_weights.values()) <= {0.0, 0.7, 1.0} and set(r.thresholds.values()) <= {0.3, 0.5}


def test_threshold_counts_match_brute_force():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand((5, 400), generator=g)
    probs[:, :20] = 0.5  # exactly on a threshold: p > t is strict, as in fusion.binarize
    gt = torch.rand((5, 400), generator=g) > 0.6
    thr = torch.tensor([0.1, 0.25, 0.5, 0.9])
    inter, pred = threshold_counts(probs, gt, thr)
    for j, t in enumerate(thr):
        m = probs > t
        assert (pred[:, j] == m.sum(1)).all() and (inter[:, j] == (m & gt).sum(1)).all()


def test_parse_grid():
    assert parse_grid("0:1:0.25", "grid") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert parse_grid("0.3,0.5", "grid") == (0.3, 0.5)
    for bad in ("0,2", "a,b", "0:1:0", ""):
        with pytest.raises(TwostageError, match="--grid"):
            parse_grid(bad, "grid")


# --- calibration by default: beside the palm checkpoint, for that checkpoint pair only --------

def _ids(root) -> list[str]:
    from twostage.data.layout import find_samples

    return sorted({s.id for s in find_samples(root, "train")})


@pytest.fixture
def pair(setup, tmp_path, make_tiny_checkpoint) -> dict:
    """Checkpoints in run folders that record their training IDs: all but the last ID."""
    ids = _ids(setup["root"])
    g = make_tiny_checkpoint(tmp_path / "runs" / "global" / "best.pt", "global", train_ids=ids[:-1])
    p = make_tiny_checkpoint(tmp_path / "runs" / "palm" / "best.pt", "palm", classes=PALM_CLASSES, seed=1,
                             train_ids=ids[:-1])
    return {"global": g, "palm": p, "held_out": ids[-1]}


def test_calibration_lands_beside_the_palm_run_and_infer_uses_it(setup, pair, tmp_path, caplog):
    root = setup["root"]
    r = calibrate(root, pair["global"], pair["palm"])  # default out, held-out IDs only
    cal_dir = pair["palm"].parent / "calibration"
    assert r.files[-1] == str(cal_dir / "calibration.json")
    record = json.loads((cal_dir / "calibration.json").read_text())
    from twostage.data.layout import find_samples

    assert {s.id for s in find_samples(root, "train") if s.name in record["images"]} == {pair["held_out"]}
    assert r.n_images == len(record["images"]) >= 1

    def run(name, *extra):
        out = tmp_path / name
        assert main(["infer", str(root), "--split", "train", "--global", str(pair["global"]), "--palm",
                     str(pair["palm"]), "--fuse", "--out", str(out), *extra]) == 0
        return out.read_bytes()

    caplog.set_level("INFO")
    auto = run("auto.csv")
    assert "calibrated by" in caplog.text
    explicit = run("explicit.csv", "--thresholds", str(cal_dir / "thresholds.yaml"),
                   "--fuse-weights", str(cal_dir / "fuse_weights.yaml"))
    default = run("default.csv", "--calibration", "none")
    assert auto == explicit
    assert auto != default  # random models: calibration moves thresholds
    # evaluate reports default and calibrated fusion side by side
    ev_out = tmp_path / "ev"
    assert main(["evaluate", str(root), "--global", str(pair["global"]), "--palm", str(pair["palm"]),
                 "--out", str(ev_out), "--pictures", "0"]) == 0
    report = json.loads((ev_out / "evaluation.json").read_text())
    assert set(report) >= {"global", "fused", "calibrated", "calibration"}
    assert (ev_out / "calibrated.csv").read_bytes() == auto and (ev_out / "fused.csv").read_bytes() == default
    assert "calibrated" in (ev_out / "table.txt").read_text().splitlines()[0]


def test_calibration_of_another_global_model_is_a_warning_not_a_silent_use(setup, pair, tmp_path, caplog,
                                                                          make_tiny_checkpoint):
    calibrate(setup["root"], pair["global"], pair["palm"])
    other = make_tiny_checkpoint(tmp_path / "other.pt", "global", seed=7)
    args = ["infer", str(setup["root"]), "--split", "train", "--palm", str(pair["palm"]), "--fuse"]
    assert main([*args, "--global", str(other), "--out", str(tmp_path / "a.csv")]) == 0
    assert "calibrated against another global checkpoint" in caplog.text
    assert main([*args, "--global", str(other), "--out", str(tmp_path / "b.csv"), "--calibration", "none"]) == 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()  # defaults used


def test_calibration_refuses_images_both_models_trained_on(setup, tmp_path, make_tiny_checkpoint, capsys):
    ids = _ids(setup["root"])
    g = make_tiny_checkpoint(tmp_path / "g" / "best.pt", "global", train_ids=ids)
    p = make_tiny_checkpoint(tmp_path / "p" / "best.pt", "palm", classes=PALM_CLASSES, train_ids=ids[:1])
    args = ["calibrate", str(setup["root"]), "--global", str(g), "--palm", str(p)]
    assert main(args) == 2
    assert "trained on by the global or palm model" in capsys.readouterr().err
    assert not (tmp_path / "p" / "calibration").exists()
    assert main([*args, "--all-images"]) == 0
    assert (tmp_path / "p" / "calibration" / "calibration.json").is_file()
    with pytest.raises(TwostageError, match="no calibration.json"):
        infer(setup["root"], g, tmp_path / "x.csv", palm_ckpt=p, fuse=True, split="train",
              calibration=tmp_path / "nowhere")


def test_min_gain_keeps_the_defaults_unless_the_gain_is_larger(setup, tmp_path):
    free = calibrate(setup["root"], setup["global"], setup["palm"], tmp_path / "a")
    gains = {c: free.calibrated_dice[c] - free.default_dice[c] for c in CLASSES}
    cut = sorted(gains.values())[len(CLASSES) // 2]  # about half the classes gain less than this
    strict = calibrate(setup["root"], setup["global"], setup["palm"], tmp_path / "b", min_gain=cut)
    for c in CLASSES:
        if gains[c] <= cut:  # not enough gain: the default pair stays
            assert strict.thresholds[c] == 0.5 and strict.fuse_weights.get(c, 0.7) == 0.7
            assert strict.calibrated_dice[c] == strict.default_dice[c]
        else:
            assert strict.calibrated_dice[c] == pytest.approx(free.calibrated_dice[c])
    with pytest.raises(TwostageError, match="min-gain"):
        calibrate(setup["root"], setup["global"], setup["palm"], tmp_path / "c", min_gain=1.5)
