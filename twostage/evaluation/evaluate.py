"""Global-only vs fused on any dataset with ground truth: the product's claim, checkable.

Runs one chain (`chain.TwoStage`) unfused, fused with the default weights and thresholds, and
— when `twostage calibrate` wrote a calibration for this checkpoint pair — fused with the
calibrated ones; scores the CSVs and writes the side-by-side table, a JSON report, a
chart of the change in Dice per class against the global model, and comparison pictures.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..classes import CLASSES
from ..data.fixes import Fixes, select_samples
from ..data.masks import load_masks
from ..io.files import make_dir, write_json_atomic, write_text_atomic
from ..io.images import read_image
from ..metrics import ScoreReport, side_by_side
from ..rle import decode, read_csv
from .score import score_csv

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Scores of both runs and the files written."""

    global_report: ScoreReport
    fused_report: ScoreReport          # default fusion weights and thresholds (or the explicit ones)
    calibrated_report: ScoreReport | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def carpal_gain(self) -> float:
        """Carpal mean of the default-run fusion (`best`) minus the global model's."""
        return float(self.best.carpal_mean - self.global_report.carpal_mean)

    @property
    def overall_gain(self) -> float:
        return float(self.best.overall - self.global_report.overall)

    @property
    def best(self) -> ScoreReport:
        """The fusion `infer --fuse` runs by default: calibrated when a calibration applies."""
        return self.calibrated_report or self.fused_report

    def table(self) -> str:
        if self.calibrated_report is None:
            return self.global_report.table(self.fused_report, names=("global", "fused"))
        return side_by_side([self.global_report, self.fused_report, self.calibrated_report],
                            ["global", "fused", "calibrated"])


def _masks_from_csv(rows: dict[str, str], shape: tuple[int, int]) -> np.ndarray:
    return np.stack([decode(rows.get(c, ""), shape) for c in CLASSES])


def write_pictures(data: str | os.PathLike, global_csv: Path, fused_csv: Path, boxes: dict,
                   out: Path, n: int = 3, fixes=None, split: str | None = None) -> list[Path]:
    """Comparison pictures (GT-only / prediction-only / overlap) of global vs fused for n images."""
    from ..box import Box
    from .visualize import write_comparison

    g_rows, f_rows = read_csv(global_csv), read_csv(fused_csv)
    samples = [s for s in select_samples(data, split, fixes)[0] if s.json_path is not None]
    written = []
    for sample in samples[:n]:
        image = read_image(sample.image_path)
        gt = load_masks(sample, CLASSES, fixes)
        box = Box(*boxes[sample.name]) if sample.name in boxes else None
        path = out / f"{Path(sample.name).stem}_global_vs_fused.png"
        write_comparison(path, image, gt, [
            ("global", _masks_from_csv(g_rows[sample.name], image.shape), box),
            ("fused", _masks_from_csv(f_rows[sample.name], image.shape), box),
        ])
        written.append(path)
    return written


def evaluate(data: str | os.PathLike, global_ckpt: str | os.PathLike, palm_ckpt: str | os.PathLike,
             out: str | os.PathLike, *, pictures: int = 3, fixes=None, split: str | None = None,
             **options) -> Evaluation:
    """Score global-only and fused predictions of DATA (which must have GT) and write the evidence.

    One `chain.TwoStage` (built with `options`, the ChainOptions fields, exactly as `infer`
    takes them) runs the global model alone, fused with the default (or explicitly given)
    weights and thresholds, and, where a calibration applies, fused with the calibrated ones.
    Writes OUT/global.csv, OUT/fused.csv, OUT/calibrated.csv, OUT/evaluation.json,
    OUT/table.txt, OUT/dice_per_class.png and OUT/pictures/*.png.
    """
    from ..inference.chain import TwoStage
    from ..inference.infer import find_images, run
    from .visualize import dice_change_chart

    out = Path(out)
    if fixes is not None and not isinstance(fixes, Fixes):
        fixes = Fixes.load(fixes)  # once, for scoring both runs and the pictures
    if split is None and (Path(data) / "train" / "DCM").is_dir():
        split = "train"  # the annotated split of a dataset root (infer alone would predict test/)
    samples = find_images(data, split)
    chain = TwoStage.build(global_ckpt, palm_ckpt, **options)
    default = chain.with_options(thresholds=options.get("thresholds"), fuse_weights=options.get("fuse_weights"))
    make_dir(out)
    g_csv, f_csv, c_csv = out / "global.csv", out / "fused.csv", out / "calibrated.csv"
    log.info("infer: global model alone")
    run(default, samples, g_csv, fuse=False)
    log.info("infer: global + palm, fused with the default weights and thresholds")
    fused = run(default, samples, f_csv, fuse=True)
    g_rep, f_rep = score_csv(g_csv, data, fixes), score_csv(f_csv, data, fixes)
    ev = Evaluation(g_rep, f_rep, files={"global_csv": g_csv, "fused_csv": f_csv})
    report = {"global": g_rep.to_dict(), "fused": f_rep.to_dict(), "boxes": fused.boxes}
    if chain.calibrated_by is not None:
        log.info("infer: global + palm, fused with %s", chain.calibrated_by)
        run(chain, samples, c_csv, fuse=True)
        ev.calibrated_report = score_csv(c_csv, data, fixes)
        ev.files["calibrated_csv"] = c_csv
        report.update(calibrated=ev.calibrated_report.to_dict(), calibration=chain.calibrated_by)
    report.update(carpal_gain=ev.carpal_gain, overall_gain=ev.overall_gain)
    ev.files["json"] = out / "evaluation.json"
    write_json_atomic(ev.files["json"], report)
    ev.files["table"] = out / "table.txt"
    write_text_atomic(ev.files["table"], ev.table() + "\n")
    ev.files["chart"] = out / "dice_per_class.png"
    dice_change_chart(ev.files["chart"], list(CLASSES),
                   {k: [report[k]["per_class"][c] for c in CLASSES] for k in ("global", "fused", "calibrated")
                    if k in report})
    if pictures:
        pics = write_pictures(data, g_csv, ev.files.get("calibrated_csv", f_csv), fused.boxes, out / "pictures",
                              pictures, fixes, split)
        ev.files.update({f"picture_{i}": p for i, p in enumerate(pics)})
    return ev
