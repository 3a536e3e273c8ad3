"""`twostage demo --quick` end to end: synth → prepare-sr → train ×2 → infer ×2 → score → pictures."""
import json

import cv2
import pytest
from conftest import run_cli

from twostage.classes import CLASSES


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--quick", "--out", out, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no official weights here: said plainly, and the demo trains its own X-ray upscaler first
    assert "Real-ESRGAN weights not usable" in proc.stderr and "training demo-xray-x4" in proc.stderr
    assert (out / "weights" / "demo-xray-x4.pth").is_file() and "against bicubic" in proc.stdout
    assert json.loads((out / "palm-data" / "palmset.json").read_text())["upscaler"] == "demo-xray-x4"
    assert "carpal mean" in proc.stdout and "overall" in proc.stdout
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    for run in ("global", "fused", "calibrated"):
        assert set(report[run]["per_class"]) == set(CLASSES)
        assert 0.0 <= report[run]["overall"] <= 1.0
    # the demo calibrates on the validation fold, and infer's default (calibrated) fusion is the claim
    assert report["carpal_gain"] == pytest.approx(report["calibrated"]["carpal_mean"] - report["global"]["carpal_mean"])
    cal = json.loads((out / "runs" / "palm" / "calibration" / "calibration.json").read_text())
    assert report["calibration"].endswith("calibration.json") and cal["images"]
    assert "calibrated" in proc.stdout
    assert len(report["boxes"]) == report["fused"]["n_images"]
    for csv in ("global.csv", "fused.csv", "calibrated.csv"):
        lines = (out / "evaluation" / csv).read_text().splitlines()
        assert lines[0] == "image_name,class,rle" and len(lines) == 1 + 29 * report["fused"]["n_images"]
    pictures = sorted((out / "evaluation" / "pictures").glob("*.png"))
    assert pictures and cv2.imread(str(pictures[0])) is not None
    assert cv2.imread(str(out / "evaluation" / "dice_per_class.png")) is not None
    assert (out / "runs" / "global" / "best.pt").is_file() and (out / "runs" / "palm" / "best.pt").is_file()
    assert "twostage train --stage demo-palm" in proc.stdout  # the by-hand commands are printed


def test_demo_refuses_an_unknown_upscaler_before_any_work(tmp_path, capsys):
    from twostage.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--upscaler", "nope"]) == 2
    err = capsys.readouterr().err
    assert "upscaler 'nope': unknown" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d" / "data").exists()


def test_demo_upscaler_choice(tmp_path):
    """auto: the official network if usable, else None (the demo trains one); a name is used as given."""
    from twostage.demo import DEMO_SR, choose_upscaler

    name, reason = choose_upscaler("auto", weights_dir=tmp_path)
    assert name is None and f"training {DEMO_SR}" in reason
    assert choose_upscaler("bicubic", weights_dir=tmp_path)[0] == "bicubic"
