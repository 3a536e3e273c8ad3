"""Shared fixtures. Helpers: append your fixtures below, do not edit others'."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from twostage.classes import CLASSES
from twostage.data import Annotation, write_annotations
from twostage.io import write_png_atomic


# --- data helper: tiny §1 datasets written to disk ------------------------------------------

def grid_annotations(size: int = 128, classes=CLASSES) -> list[Annotation]:
    """One small square polygon per class on a grid, all inside a size×size image."""
    cols = 6
    cell = size // cols
    out = []
    for i, c in enumerate(classes):
        x0, y0 = (i % cols) * cell + 2, (i // cols) * cell + 2
        pts = np.array([[x0, y0], [x0 + cell - 5, y0], [x0 + cell - 5, y0 + cell - 5], [x0, y0 + cell - 5]])
        out.append(Annotation(c, pts.astype(np.int32), f"id-{i:04d}"))
    return out


def phantom(size: int = 128, seed: int = 0) -> np.ndarray:
    """A grey (H, W) uint8 test image."""
    rng = np.random.default_rng(seed)
    return rng.integers(20, 200, (size, size), dtype=np.uint8)


@pytest.fixture
def write_sample() -> Callable[..., tuple[Path, Path | None]]:
    """write_sample(root, rel, image=None, annotations=None, split="train", size=128)
    writes root/split/DCM/rel (PNG) and, for annotations (a list, or a dict written
    verbatim as JSON), root/split/outputs_json/rel.json; returns (png, json-or-None)."""
    import json

    def _write(root: Path, rel: str, image: np.ndarray | None = None, annotations=None,
               split: str = "train", size: int = 128) -> tuple[Path, Path | None]:
        png = Path(root) / split / "DCM" / rel
        write_png_atomic(png, phantom(size) if image is None else image)
        if annotations is None:
            return png, None
        js = (Path(root) / split / "outputs_json" / rel).with_suffix(".json")
        if isinstance(annotations, dict):
            js.parent.mkdir(parents=True, exist_ok=True)
            js.write_text(json.dumps(annotations))
        else:
            write_annotations(js, annotations, Path(rel).name, (size, size))
        return png, js

    return _write


@pytest.fixture
def tiny_dataset(tmp_path: Path, write_sample) -> Path:
    """A clean 128 px dataset: 2 IDs × L/R hands with all 29 classes, 1 test image, metadata.csv."""
    root = tmp_path / "DATA"
    for pid in ("ID001", "ID002"):
        for side in ("L", "R"):
            write_sample(root, f"{pid}/image{pid[-1]}00_{side}.png", annotations=grid_annotations())
    write_sample(root, "ID003/image300_R.png", split="test")
    (root / "meta_data.csv").write_text("ID,Age,Sex,Weight,Height\n1,30,M,70,175\n2,41,F,55,160\n3,8,F,25,120\n")
    return root
