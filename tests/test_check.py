"""`twostage check`: every error and warning produced by a dataset that has the problem."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import grid_annotations, phantom, run_cli

from twostage.cli import main
from twostage.data.annotations import Annotation
from twostage.data.check import check_dataset


def _codes(report) -> dict[str, int]:
    return {p.code: p.count for p in [*report.errors.values(), *report.warnings.values()]}


def test_clean_dataset_has_no_findings(tiny_dataset, capsys):
    report = check_dataset(tiny_dataset, expected_size=128)
    assert report.ok and _codes(report) == {}
    assert report.splits == {"train": {"images": 4, "annotated": 4}, "test": {"images": 1}}
    assert main(["check", str(tiny_dataset), "--size", "128"]) == 0
    assert "OK: 0 error(s), 0 warning(s)" in capsys.readouterr().out


def _break(root: Path, write_sample, problem: str) -> None:
    """Give the tiny dataset one problem."""
    train = root / "train"
    first = train / "DCM" / "ID001" / "image100_L.png"
    first_json = train / "outputs_json" / "ID001" / "image100_L.json"
    anns = grid_annotations()
    if problem == "corrupt_png":
        first.write_bytes(first.read_bytes()[:100])
    elif problem == "empty_png":
        first.write_bytes(b"")
    elif problem == "invalid_json":
        first_json.write_text('{"annotations": [')
    elif problem == "malformed_json":
        first_json.write_text('{"annotations": [{"label": "Lunate"}]}')
    elif problem == "image_without_json":
        first_json.unlink()
    elif problem == "json_without_image":
        first.unlink()
    elif problem == "unknown_label":
        write_sample(root, "ID001/image100_L.png", annotations=anns + [Annotation("ring", anns[0].points)])
    elif problem == "short_polygon":
        anns[5] = Annotation(anns[5].label, anns[5].points[:2])
        write_sample(root, "ID001/image100_L.png", annotations=anns)
    elif problem == "points_outside":
        anns[5] = Annotation(anns[5].label, anns[5].points + np.array([0, 120], np.int32))
        write_sample(root, "ID001/image100_L.png", annotations=anns)
    elif problem == "duplicate_label":
        write_sample(root, "ID001/image100_L.png", annotations=anns + [anns[3]])
    elif problem == "missing_classes":
        write_sample(root, "ID001/image100_L.png", annotations=anns[:-2])
    elif problem == "mixed_sizes":
        write_sample(root, "ID001/image100_L.png", annotations=anns, size=160)
    elif problem == "sixteen_bit":
        cv2.imwrite(str(first), phantom().astype(np.uint16) * 257)
    elif problem == "alpha_channel":
        img = phantom()
        cv2.imwrite(str(first), np.dstack([img, img, img, np.full_like(img, 255)]))
    elif problem == "colour_image":
        img = phantom()
        cv2.imwrite(str(first), np.dstack([img, img, 255 - img]))
    elif problem == "metadata_missing_id":
        (root / "meta_data.csv").write_text("ID,age\n1,30\n")
    elif problem == "metadata_unreadable":
        (root / "meta_data.csv").write_text("name,age\nx,30\n")
    else:
        raise AssertionError(problem)


@pytest.mark.parametrize("problem, code, fatal", [
    ("corrupt_png", "corrupt_png", True),
    ("empty_png", "corrupt_png", True),
    ("invalid_json", "invalid_json", True),
    ("malformed_json", "invalid_json", True),
    ("image_without_json", "image_without_json", False),
    ("json_without_image", "json_without_image", False),
    ("unknown_label", "unknown_label", False),
    ("short_polygon", "short_polygon", False),
    ("points_outside", "points_outside", False),
    ("duplicate_label", "duplicate_label", False),
    ("missing_classes", "missing_classes", False),
    ("mixed_sizes", "mixed_sizes", False),
    ("sixteen_bit", "sixteen_bit", False),
    ("alpha_channel", "alpha_channel", False),
    ("colour_image", "colour_image", False),
    ("metadata_missing_id", "metadata_missing_id", False),
    ("metadata_unreadable", "metadata_unreadable", False),
])
def test_each_problem_is_reported(tiny_dataset, write_sample, capsys, problem, code, fatal):
    _break(tiny_dataset, write_sample, problem)
    report = check_dataset(tiny_dataset)
    codes = _codes(report)
    assert code in codes, codes
    assert (code in report.errors) == fatal and report.ok != fatal
    assert set(codes) == {code}  # only the planted problem
    assert main(["check", str(tiny_dataset)]) == (1 if fatal else 0)
    out = capsys.readouterr()
    assert code in out.out and "Traceback" not in out.out + out.err


def test_counts_and_examples_are_grouped(tiny_dataset, write_sample):
    anns = grid_annotations()
    moved = [Annotation(a.label, a.points + np.array([0, 120], np.int32), a.id) for a in anns]
    for pid, side in (("ID001", "L"), ("ID001", "R"), ("ID002", "L")):
        write_sample(tiny_dataset, f"{pid}/image{pid[-1]}00_{side}.png", annotations=moved)
    report = check_dataset(tiny_dataset)
    outside = report.warnings["points_outside"]
    assert outside.count > 5 and len(outside.examples) == 5
    assert "points outside 128x128" in outside.examples[0]
    assert outside.examples[0].startswith("train/outputs_json/ID001/image100_L.json: ")  # the file to edit
    assert "more" in report.text()


def test_expected_size_and_json_output(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["check", str(tiny_dataset), "--size", "2048", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and report["sizes"] == {"128x128": 5}
    sizes = {w["code"]: w for w in report["warnings"]}["unexpected_size"]
    assert sizes["count"] == 5 and "expected 2048x2048" in sizes["examples"][0]
    assert "unexpected_size ×5" in capsys.readouterr().out


def test_no_images_is_an_error(tmp_path, capsys):
    (tmp_path / "empty" / "train" / "DCM").mkdir(parents=True)
    report = check_dataset(tmp_path / "empty")
    assert "no_images" in report.errors and not report.ok
    (tmp_path / "nothing").mkdir()
    assert main(["check", str(tmp_path / "nothing")]) == 1
    assert main(["check", str(tmp_path / "missing")]) == 2
    assert "missing: no such folder" in capsys.readouterr().err


def test_fixes_are_applied_before_label_checks(tiny_dataset, write_sample, tmp_path):
    anns = grid_annotations()
    anns[5] = Annotation("finger-66", anns[5].points, "id-0005")
    write_sample(tiny_dataset, "ID001/image100_L.png", annotations=anns)
    assert "unknown_label" in check_dataset(tiny_dataset).warnings
    fixes = tmp_path / "fixes.yaml"
    fixes.write_text("image100_L.png:\n  relabel: [{from: finger-66, to: finger-6}]\n"
                     "ID002/image200_R.png:\n  drop_image: true\n  drop: [{id: nope}]\n"
                     "image999_R.png:\n  drop_image: true\n"
                     "ID001/image100_R:\n  drop: [{id: nope}]\n")
    report = check_dataset(tiny_dataset, fixes=fixes)
    assert set(_codes(report)) == {"fixes_unknown_image", "fixes_unused_rule"}
    assert report.warnings["fixes_unknown_image"].examples == [f"{fixes}: image999_R"]
    assert report.warnings["fixes_unused_rule"].examples == ["train/ID001/image100_R.png: drop(id=nope)"]
    assert report.splits["train"]["dropped by fixes"] == 1


def test_bad_fixes_file_is_one_line_error(tiny_dataset, tmp_path, capsys):
    fixes = tmp_path / "fixes.yaml"
    fixes.write_text("image100_L.png:\n  relabel: [{from: a, to: Lunatum}]\n")
    assert main(["check", str(tiny_dataset), "--fixes", str(fixes)]) == 2
    err = capsys.readouterr().err
    assert "fixes.yaml" in err and "Lunatum" in err and "Traceback" not in err


def test_check_command_runs_as_module(tiny_dataset):
    _break(tiny_dataset, None, "corrupt_png")
    run = run_cli("check", tiny_dataset, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "corrupt_png ×1" in run.stdout and "FAILED" in run.stdout
