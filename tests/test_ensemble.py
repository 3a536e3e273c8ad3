"""`twostage ensemble`: hard voting over CSVs, soft voting over saved probabilities."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.cli import main
from twostage.errors import TwostageError
from twostage.evaluation.ensemble import average_probs, vote_csvs
from twostage.inference.probs import read_probs, write_probs
from twostage.rle import decode, encode_masks, read_csv, write_csv

H, W = 6, 8
NAMES = ["a.png", "b.png"]


def _masks(csv: Path, classes=CLASSES) -> dict[str, np.ndarray]:
    rows = read_csv(csv)
    return {n: np.stack([decode(rows[n][c], (H, W)) for c in classes]).astype(bool) for n in rows}


def _random_csvs(tmp_path: Path, k: int, seed: int = 0) -> tuple[list[Path], list[dict]]:
    rng = np.random.default_rng(seed)
    paths, masks = [], []
    for i in range(k):
        m = {n: rng.random((len(CLASSES), H, W)) < 0.5 for n in NAMES}
        paths.append(tmp_path / f"m{i}.csv")
        write_csv(paths[-1], [(n, encode_masks(m[n])) for n in NAMES])
        masks.append(m)
    return paths, masks


def test_hard_vote_of_three_equals_hand_computed_majority(tmp_path):
    a = np.array([[1, 1, 0, 0, 1, 0, 0, 0]] * H, bool)
    b = np.array([[1, 0, 1, 0, 1, 1, 0, 0]] * H, bool)
    c = np.array([[0, 1, 1, 0, 0, 0, 1, 1]] * H, bool)
    expected = np.array([[1, 1, 1, 0, 1, 0, 0, 0]] * H, bool)  # at least 2 of 3, by hand
    paths = []
    for k, m in enumerate((a, b, c)):
        stack = np.zeros((len(CLASSES), H, W), bool)
        stack[CLASSES.index("Lunate")] = m
        stack[CLASSES.index("finger-1")] = m if k == 0 else False  # one vote of three: dropped
        paths.append(tmp_path / f"{k}.csv")
        write_csv(paths[-1], [("x.png", encode_masks(stack))])
    out = tmp_path / "vote.csv"
    summary = vote_csvs(paths, out)
    got = _masks(out)["x.png"]
    assert (got[CLASSES.index("Lunate")] == expected).all()
    assert not got[CLASSES.index("finger-1")].any()
    assert summary.rule["Lunate"] == 2 and summary.images == 1
    # byte-identical rows and order to a CSV written directly from the expected masks
    ref = tmp_path / "ref.csv"
    exp = np.zeros((len(CLASSES), H, W), bool)
    exp[CLASSES.index("Lunate")] = expected
    write_csv(ref, [("x.png", encode_masks(exp))])
    assert out.read_bytes() == ref.read_bytes()


def test_hard_vote_random_masks_and_min_votes(tmp_path):
    paths, masks = _random_csvs(tmp_path, 4)
    out = tmp_path / "vote.csv"
    vote_csvs(paths, out)  # 4 voters: more than half = 3
    got = _masks(out)
    for n in NAMES:
        assert (got[n] == (sum(m[n].astype(int) for m in masks) >= 3)).all()
    assert main(["ensemble", "--csv", *map(str, paths), "--min-votes", "1", "--out", str(out)]) == 0
    got = _masks(out)
    for n in NAMES:
        assert (got[n] == np.any([m[n] for m in masks], axis=0)).all()  # one vote: the union


def test_palm_only_csv_changes_only_palm_classes(tmp_path):
    paths, masks = _random_csvs(tmp_path, 2)
    palm = tmp_path / "palm.csv"
    rng = np.random.default_rng(7)
    pm = {n: rng.random((len(PALM_CLASSES), H, W)) < 0.5 for n in NAMES}
    write_csv(palm, [(n, encode_masks(pm[n])) for n in NAMES], classes=PALM_CLASSES)
    two, three = tmp_path / "two.csv", tmp_path / "three.csv"
    vote_csvs(paths, two)
    summary = vote_csvs([*paths, palm], three)
    g2, g3 = _masks(two), _masks(three)
    palm_idx = [CLASSES.index(c) for c in PALM_CLASSES]
    other = [i for i in range(len(CLASSES)) if i not in palm_idx]
    for n in NAMES:
        assert (g2[n][other] == g3[n][other]).all()
        votes = masks[0][n][palm_idx].astype(int) + masks[1][n][palm_idx] + pm[n]
        assert (g3[n][palm_idx] == (votes >= 2)).all()
    assert any((g2[n][palm_idx] != g3[n][palm_idx]).any() for n in NAMES)
    assert summary.rule["finger-1"] == 2 and summary.rule["Lunate"] == 2
    # two palm-only CSVs give a palm-only CSV
    only = tmp_path / "only.csv"
    vote_csvs([palm, palm], only)
    assert set(read_csv(only)["a.png"]) == set(PALM_CLASSES)


def test_hard_vote_errors_name_the_problem(tmp_path):
    paths, _ = _random_csvs(tmp_path, 2)
    short = tmp_path / "short.csv"
    write_csv(short, [("a.png", [""] * len(CLASSES))])
    with pytest.raises(TwostageError, match=r"short.csv: missing 1 image.*b.png"):
        vote_csvs([*paths, short], tmp_path / "x.csv")
    bad = tmp_path / "bad.csv"
    lines = paths[0].read_text().splitlines()
    lines = ["a.png,Ulna,5" if line.startswith("a.png,Ulna,") else line for line in lines]  # odd RLE
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(TwostageError, match=r"bad.csv: image a.png class Ulna"):
        vote_csvs([paths[1], bad], tmp_path / "x.csv")
    with pytest.raises(TwostageError, match="at least 2"):
        vote_csvs(paths[:1], tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()  # nothing half-written


def _probs_dir(folder: Path, probs: dict[str, np.ndarray], classes=CLASSES) -> Path:
    for n, p in probs.items():
        write_probs(folder / (Path(n).stem + ".npz"), torch.from_numpy(p), classes)
    return folder


def test_soft_vote_of_one_input_is_that_input_thresholded(tmp_path):
    rng = np.random.default_rng(1)
    probs = {n: rng.random((len(CLASSES), H, W)).astype(np.float32) for n in NAMES}
    d = _probs_dir(tmp_path / "p", probs)
    thr = tmp_path / "thr.yaml"
    thr.write_text("thresholds:\n  default: 0.5\n  Lunate: 0.2\n")
    out = tmp_path / "soft.csv"
    rc = main(["ensemble", "--probs", str(d), "--thresholds", str(thr), "--out", str(out)])
    assert rc == 0
    got = _masks(out)
    t = np.full(len(CLASSES), 0.5, np.float32)
    t[CLASSES.index("Lunate")] = 0.2
    for n in NAMES:
        saved = read_probs(d / (Path(n).stem + ".npz"))[1]
        assert (got[n] == (saved > t[:, None, None])).all()
    assert list(read_csv(out)) == sorted(NAMES)


def test_soft_vote_weighted_mean_with_a_palm_only_input(tmp_path):
    rng = np.random.default_rng(2)
    full = {n: rng.random((len(CLASSES), H, W)).astype(np.float32) for n in NAMES}
    palm = {n: rng.random((len(PALM_CLASSES), H, W)).astype(np.float32) for n in NAMES}
    d1, d2 = _probs_dir(tmp_path / "g", full), _probs_dir(tmp_path / "p", palm, PALM_CLASSES)
    out = tmp_path / "soft.csv"
    average_probs([d1, d2], out, weights=[1.0, 3.0])
    got = _masks(out)
    palm_idx = [CLASSES.index(c) for c in PALM_CLASSES]
    for n in NAMES:
        g = read_probs(d1 / (Path(n).stem + ".npz"))[1]
        p = read_probs(d2 / (Path(n).stem + ".npz"))[1]
        expect = g.copy()
        expect[palm_idx] = (g[palm_idx] + 3 * p) / 4
        near = np.abs(expect - 0.5) < 1e-5  # float rounding may flip pixels exactly at the threshold
        assert ((got[n] == (expect > 0.5)) | near).all()
        assert (got[n][:19] == (g[:19] > 0.5)).all()  # fingers: the full input alone


def test_soft_vote_errors(tmp_path):
    rng = np.random.default_rng(3)
    probs = {n: rng.random((len(CLASSES), H, W)).astype(np.float32) for n in NAMES}
    d1 = _probs_dir(tmp_path / "a", probs)
    d2 = _probs_dir(tmp_path / "b", {"a.png": probs["a.png"]})
    with pytest.raises(TwostageError, match=r"b: missing 1 image.*b.png"):
        average_probs([d1, d2], tmp_path / "x.csv")
    with pytest.raises(TwostageError, match="one each"):
        average_probs([d1], tmp_path / "x.csv", weights=[1, 2])
    with pytest.raises(TwostageError, match="no such probabilities folder"):
        average_probs([tmp_path / "nope"], tmp_path / "x.csv")


def test_cli_subprocess_usage_errors(tmp_path):
    paths, _ = _random_csvs(tmp_path, 2)
    r = run_cli("ensemble", "--csv", *paths, "--weights", "1", "2", "--out", tmp_path / "o.csv")
    assert_one_line_error(r, "soft voting", rc=2)
    r = run_cli("ensemble", "--csv", *paths, "--out", tmp_path / "o.csv")
    assert r.returncode == 0 and "hard voting over 2 inputs" in r.stdout


@pytest.mark.parametrize("data", [b"PK\x03\x04garbage", b"PK\x05\x06" + b"\0" * 18])
def test_an_unreadable_probabilities_file_is_closed(tmp_path, data):
    """np.load leaks the handle it opens when the zip directory is unreadable; read_probs opens
    its own (ensembling reads thousands of these files)."""
    import gc
    import warnings

    path = tmp_path / "image.npz"
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TwostageError, match="not a saved-probabilities file"):
            read_probs(path)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
