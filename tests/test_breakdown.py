"""Dice broken down by a metadata column: `evaluation.score.breakdown_by` and `twostage score --by`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from twostage.classes import CLASSES
from twostage.cli import main
from twostage.data.layout import find_samples
from twostage.data.masks import load_masks
from twostage.errors import TwostageError
from twostage.evaluation.score import UNKNOWN_GROUP, breakdown_by
from twostage.metrics import summarize
from twostage.rle import encode_masks, write_csv


def _per_image(values: dict[str, float]) -> dict[str, np.ndarray]:
    return {n: np.full(len(CLASSES), v) for n, v in values.items()}


def test_groups_by_category_and_numeric_bins():
    per_image = _per_image({"a.png": 0.9, "b.png": 0.7, "c.png": 0.5, "d.png": 0.1})
    ids = {"a.png": "ID001", "b.png": "ID001", "c.png": "ID002", "d.png": "ID003"}
    meta = {"ID001": {"sex": "F", "age": 30}, "ID002": {"sex": "M", "age": 61}, "ID003": {"sex": "", "age": 8}}
    report = summarize(per_image)
    by_sex = breakdown_by(report, meta, "sex", ids)
    assert list(by_sex) == ["F", "M", UNKNOWN_GROUP]
    assert by_sex["F"].n_images == 2 and by_sex["F"].overall == pytest.approx(0.8)
    assert by_sex["M"].overall == pytest.approx(0.5) and by_sex[UNKNOWN_GROUP].overall == pytest.approx(0.1)
    by_age = breakdown_by(per_image, meta, "age", ids, bins=[18, 60])
    assert list(by_age) == ["<18", "18-60", ">=60"]
    assert by_age["18-60"].n_images == 2 and by_age[">=60"].overall == pytest.approx(0.5)
    with pytest.raises(TwostageError, match="did you mean sex"):
        breakdown_by(per_image, meta, "sexx", ids)
    with pytest.raises(TwostageError, match="not numeric"):
        breakdown_by(per_image, meta, "sex", ids, bins=[1, 2])


def test_score_cli_by_column(tmp_path, tiny_dataset, capsys):
    samples = find_samples(tiny_dataset)
    rows = []
    for k, s in enumerate(samples):  # person ID001 perfect, ID002 one class wrong
        m = load_masks(s)
        if s.id == "ID002":
            m[CLASSES.index("Ulna")] = 0
        rows.append((s.name, encode_masks(m)))
    csv = tmp_path / "p.csv"
    write_csv(csv, rows)
    out = tmp_path / "r.json"
    assert main(["score", str(csv), "--gt", str(tiny_dataset), "--by", "sex", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sex" in text
    groups = json.loads(out.read_text())["by"]["groups"]
    assert groups["M"]["overall"] == pytest.approx(1.0) and groups["M"]["n_images"] == 2
    assert groups["F"]["overall"] == pytest.approx(28 / 29)
