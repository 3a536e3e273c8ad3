"""benchmarks/gpu_check.py and its comparison (benchmarks/device_compare.py), on a CPU.

The comparison must pass what fp16 / TF32 do to confident probabilities and fail what a device
bug does (a one-pixel shift, swapped classes, no palm fusion); a step must end within its
timeout; the script must write its table with a FAIL exactly when a bug is injected.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
_path = list(sys.path)
sys.path.insert(0, str(BENCH))
import device_compare as dc  # noqa: E402
import gpu_check  # noqa: E402

sys.path[:] = _path  # benchmarks/ holds infer.py, sr.py, ...: not importable names for other tests

CLASSES = [f"c{i}" for i in range(4)]
THR = np.full(len(CLASSES), 0.5, np.float32)


def confident_logits(shape=(4, 96, 96), seed: int = 0) -> np.ndarray:
    """Smooth random logits like a confident model's: ~10 % above 0, std dc.SPREAD."""
    import cv2

    rng = np.random.default_rng(seed)
    z = np.stack([cv2.GaussianBlur(rng.normal(size=shape[1:]).astype(np.float32), (0, 0), 2.0)
                  for _ in range(shape[0])])
    z = (z - z.mean((1, 2), keepdims=True)) / z.std((1, 2), keepdims=True)
    return dc.SPREAD * (z - np.quantile(z, 0.9, axis=(1, 2), keepdims=True))


def saved(z: np.ndarray) -> np.ndarray:
    """Probabilities as infer --save-probs keeps them: uint8 / 255."""
    return np.round(1 / (1 + np.exp(-z)) * 255) / 255


def judge(ref: np.ndarray, dev: np.ndarray, boxes=({}, {})) -> dict:
    return dc.verdict(dc.compare_probs(ref, dev, THR, CLASSES), *boxes)


def test_fp16_like_noise_on_confident_probabilities_passes():
    z = confident_logits()
    noise = np.random.default_rng(1).normal(scale=0.01 * dc.SPREAD, size=z.shape)  # fp16: ~0.5 % of the spread
    v = judge(saved(z), saved(z + noise))
    assert v["pass"], v["figure"]
    assert v["max_abs"] < 0.03 and v["worst_flip_ppm"] == 0
    assert v["informative"]


def test_one_pixel_shift_fails():
    z = confident_logits()
    v = judge(saved(z), saved(np.roll(z, 1, axis=-1)))
    assert not v["pass"]
    assert v["worst_flip_ppm"] > 100 * dc.FLIP_PPM and v["max_abs"] > 0.5


def test_swapped_classes_fail():
    z = confident_logits()
    v = judge(saved(z), saved(z[[1, 0, 2, 3]]))
    assert not v["pass"] and v["worst_flip_class"] in ("c0", "c1")


def test_near_threshold_flips_alone_pass():
    p = saved(confident_logits())
    q = p.copy()
    near = np.abs(p - 0.5) < 0.04
    q[near] = 1 - p[near]  # every pixel within 0.04 of the threshold flips sides
    d = dc.compare_probs(p, q, THR, CLASSES)
    v = dc.verdict(d)
    assert d.near_flips.sum() > 100 and d.confident_flips.sum() == 0
    assert v["pass"], v["figure"]


def test_an_uninformative_reference_fails():
    p = np.full((4, 32, 32), 0.01, np.float32)  # all background: identical runs prove nothing
    v = judge(p, p)
    assert not v["pass"] and not v["informative"]


def test_boxes():
    p = saved(confident_logits())
    ref = {"a.png": [10, 10, 50]}
    assert judge(p, p, (ref, {"a.png": [11, 10, 50]}))["pass"]
    assert not judge(p, p, (ref, {"a.png": [12, 10, 50]}))["pass"]
    assert not judge(p, p, (ref, {}))["pass"]  # the device did not fuse


def test_a_step_that_hangs_is_a_fail_row(monkeypatch):
    monkeypatch.setitem(gpu_check.STEPS, "hang", (1, 3))
    chk = gpu_check.Check(budget_s=60, env={})
    ok = chk.step("hang", "hang", [sys.executable, "-c", "import time; time.sleep(60)"])
    row = chk.rows[-1]
    assert not ok and row["status"] == "FAIL" and "timed out" in row["figure"]
    assert row["seconds"] < 15
    chk.step("later", "hang", [sys.executable, "-c", "pass"], optional=True)
    assert chk.rows[-1]["status"] == "PASS"
    chk.budget = 0  # spent: a required step is a FAIL, an optional one a SKIP
    chk.step("required", "hang", [sys.executable, "-c", "pass"])
    chk.step("optional", "hang", [sys.executable, "-c", "pass"], optional=True)
    assert [r["status"] for r in chk.rows[-2:]] == ["FAIL", "SKIP"]


def test_pytest_summary_is_the_figure():
    out = "....\n3 passed, 1 skipped, 200 deselected in 4.12s\n"
    assert gpu_check.pytest_judge(True)(0, out, 4.0) == {"pass": True, "figure": "3 passed, 1 skipped, 200 deselected"}
    assert not gpu_check.pytest_judge(True)(0, "5 skipped, 9 deselected in 1s\n", 1.0)["pass"]  # no CUDA seen
    assert not gpu_check.pytest_judge(True)(1, "1 failed, 2 passed in 3s\n", 1.0)["pass"]


TINY = ["--device", "cpu", "--size", "256", "--n", "2", "--test-n", "1", "--skip-tests", "--skip-sr",
        "--skip-train", "--skip-benchmarks", "--set", "model.input_size=64", "--set", "model.arch=Unet",
        "--set", "model.encoder=resnet18"]


def run_check(tmp_path: Path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), *TINY, "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=600)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("bug", [None, "shift"])
def test_end_to_end_on_cpu(tmp_path: Path, bug):
    rc, table = run_check(tmp_path, *(["--inject-bug", bug] if bug else []))
    rows = {r["name"]: r for r in table["rows"]}
    for r in table["rows"]:
        assert {"name", "pass", "figure", "target"} <= set(r) and r["status"] in ("PASS", "FAIL", "SKIP")
    compare = rows["cpu again vs cpu: probabilities, masks, boxes"]
    assert rows["infer --fuse on cpu again"]["pass"]
    assert rows["CUDA-only tests (pytest -k cuda)"]["status"] == "SKIP"
    if bug is None:
        assert rc == 0 and table["passed"] and compare["pass"], compare["figure"]
        assert compare["max_abs"] == 0 and compare["informative"]
    else:
        assert rc != 0 and not table["passed"] and not compare["pass"]
        assert compare["worst_flip_ppm"] > dc.FLIP_PPM
        assert [r["name"] for r in table["rows"] if r["pass"] is False] == [compare["name"]]
