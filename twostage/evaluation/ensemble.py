"""Ensembles of finished predictions (docs/DESIGN.md §4): hard voting over §2 CSVs, soft voting over
the probabilities `twostage infer --save-probs` writes.

Both stream image by image, so memory does not grow with the number of images: a CSV is
indexed once (byte offset of each image's rows) and each image's rows are read when it is
voted; a probabilities folder holds one file per image. Votes are counted for all classes
at once on the chosen device; the result goes through `twostage.rle.encode_masks` into a
`twostage.rle.CsvWriter` (the CSV appears only when every image succeeded).

An input with fewer classes (e.g. a palm model's 8 carpals) is aligned by class name and
votes only for its own classes; the output holds every class some input has, in CLASSES
order.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..classes import CLASS_TO_INDEX, CLASSES
from ..devices import torch_device
from ..errors import TwostageError, first_few
from ..rle import CSV_HEADER, csv_reader

log = logging.getLogger(__name__)


@dataclass
class EnsembleSummary:
    """What an ensemble run wrote: the CSV, counts, the per-class vote rule and timing."""

    out: str
    mode: str  # "hard" or "soft"
    images: int
    inputs: list[str]
    classes: list[str]
    rule: dict[str, float] = field(default_factory=dict)  # hard: votes needed; soft: threshold
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _check_same_images(inputs: Sequence[str], name_sets: Sequence[set[str]]) -> None:
    """Every input must hold the same images; the error names what each one lacks."""
    union = set().union(*name_sets)
    problems = [f"{src}: missing {len(union - names)} image(s) present in another input: "
                f"{first_few(sorted(union - names))}" for src, names in zip(inputs, name_sets) if union - names]
    if problems:
        raise TwostageError("inputs cover different images; " + "; ".join(problems))


def _output_classes(inputs: Sequence[str], class_lists: Sequence[Sequence[str]]) -> list[str]:
    unknown = sorted({c for cl in class_lists for c in cl if c not in CLASS_TO_INDEX})
    if unknown:
        src = next(s for s, cl in zip(inputs, class_lists) if unknown[0] in cl)
        raise TwostageError(f"{src}: unknown class name(s) {first_few(unknown)}")
    have = {c for cl in class_lists for c in cl}
    return [c for c in CLASSES if c in have]


def _rows_of(out_classes: Sequence[str], classes: Sequence[str]) -> slice | list[int]:
    """Output rows of an input's classes: a slice when contiguous and in order (a view, no
    gather/scatter when adding), else an index list."""
    rows = [out_classes.index(c) for c in classes]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows


# --------------------------------------------------------------------------- hard voting

class CsvIndex:
    """Where each image's rows sit in a submission CSV (docs/DESIGN.md §2): read once, then one image at a time.

    Checks the header, that each image's rows are contiguous and that every image has the
    same classes (a CSV is one model's prediction); memory is a few integers per image.
    """

    def __init__(self, path: str | os.PathLike):

        self.path = Path(path)
        self.spans: dict[str, tuple[int, int]] = {}
        self.order: list[str] = []
        classes: dict[str, list[str]] = {}
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise TwostageError(f"{self.path}: cannot read ({e.strerror or e})") from None
        with f:
            header = f.readline()
            if not header.strip():
                raise TwostageError(f"{self.path}: empty file, expected the header {','.join(CSV_HEADER)}")
            if [h.strip() for h in self._fields(header, 1)] != list(CSV_HEADER):
                raise TwostageError(f"{self.path}:1: header is {header.decode('utf-8', 'replace').strip()!r}, "
                                    f"expected {','.join(CSV_HEADER)!r}")
            pos, line_no, current = f.tell(), 1, None
            for line in iter(f.readline, b""):
                line_no += 1
                start, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                name, cls, _ = self._fields(line, line_no)
                if name != current:
                    if name in self.spans:
                        raise TwostageError(f"{self.path}:{line_no}: rows of image {name!r} are not contiguous")
                    self.spans[name] = (start, pos)
                    self.order.append(name)
                    classes[name] = []
                    current = name
                else:
                    self.spans[name] = (self.spans[name][0], pos)
                if cls in classes[name]:
                    raise TwostageError(f"{self.path}:{line_no}: second row for image {name!r} class {cls!r}")
                classes[name].append(cls)
        if not self.order:
            raise TwostageError(f"{self.path}: no prediction rows")
        first = classes[self.order[0]]
        for name in self.order:
            if sorted(classes[name]) != sorted(first):
                missing = sorted(set(first) - set(classes[name])) or sorted(set(classes[name]) - set(first))
                raise TwostageError(f"{self.path}: image {name} has classes differing from {self.order[0]} "
                                    f"({first_few(missing)}); every image of one CSV needs the same classes")
        self.classes = list(first)

    def _fields(self, line: bytes, line_no: int) -> list[str]:
        try:
            text = line.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise TwostageError(f"{self.path}:{line_no}: not UTF-8 text ({e.reason})") from None
        if '"' in text:
            try:
                row = next(csv_reader([text]))
            except csv.Error as e:
                raise TwostageError(f"{self.path}:{line_no}: malformed CSV ({e})") from None
        else:
            row = text.rstrip("\r\n").split(",")
        if len(row) != 3:
            raise TwostageError(f"{self.path}:{line_no}: {len(row)} fields, expected 3 (image_name,class,rle)")
        return row

    def rows(self, name: str) -> dict[str, str]:
        """{class: rle} of one image, read from disk."""
        start, end = self.spans[name]
        with open(self.path, "rb") as f:
            f.seek(start)
            block = f.read(end - start)
        # split as the index was read (at b"\n" only: str.splitlines also splits at \x0c, \u2028, ...)
        return {cls: rle for _, cls, rle in (self._fields(line, 0) for line in block.split(b"\n") if line.strip())}


def _rle_end(rle: str) -> int:
    """One past the last foreground pixel of an RLE (0 for an empty mask), without decoding."""
    tail = rle.rsplit(maxsplit=2)
    if len(tail) < 2:
        return 0
    try:
        return int(tail[-2]) - 1 + int(tail[-1])
    except ValueError:
        return 0  # malformed: decode() reports it with its own message


def _decode_flat(rle: str, length: int, where: str) -> np.ndarray:
    """(length,) uint8 mask of an RLE over the flattened image (the rule lives in rle.decode)."""
    from ..rle import decode

    try:
        return decode(rle, (1, length))[0]
    except TwostageError as e:
        raise TwostageError(f"{where}: {e}") from None


def vote_csvs(csvs: Sequence[str | os.PathLike], out: str | os.PathLike, *, min_votes: int | None = None,
              device: str = "cpu") -> EnsembleSummary:
    """Hard (majority) voting of prediction CSVs into one CSV, per pixel and class.

    A pixel belongs to class c when at least `need_c` of the CSVs that HAVE class c mark it:
    by default more than half of them (2 of 3, 2 of 2, 3 of 4); `min_votes` sets the count for
    every class, capped at the number of CSVs having the class (so a palm-only CSV among three
    does not make the other classes unreachable). Masks are voted over the flattened image, so
    no image size is needed (pixels past every input's last run are background in all).

    Args:
        csvs: two or more submission CSVs over the same images (output order = the first CSV's order).
        out: the CSV to write, atomically.
        min_votes: votes a pixel needs (≥ 1); None for a strict majority.
        device: torch device the votes are counted and the runs found on.
    Raises:
        TwostageError: fewer than 2 inputs, different image sets (naming the missing images),
        unknown class names, malformed RLEs (naming file, image and class).
    """
    from tqdm import tqdm

    from ..rle import CsvWriter, encode_masks

    t0 = time.perf_counter()
    if len(csvs) < 2:
        raise TwostageError(f"hard voting needs at least 2 CSVs, got {len(csvs)}")
    if min_votes is not None and min_votes < 1:
        raise TwostageError(f"--min-votes {min_votes}: must be at least 1")
    dev = torch_device(device)
    inputs = [str(p) for p in csvs]
    indexes = [CsvIndex(p) for p in csvs]
    _check_same_images(inputs, [set(ix.spans) for ix in indexes])
    classes = _output_classes(inputs, [ix.classes for ix in indexes])
    voters = np.array([[c in ix.classes for ix in indexes] for c in classes]).sum(1)  # (C,)
    need = voters // 2 + 1 if min_votes is None else np.minimum(min_votes, voters)
    if min_votes is not None and (capped := [c for c, v in zip(classes, voters) if v < min_votes]):
        log.info("--min-votes %d: only %d CSV(s) have %s; those need all of their votes", min_votes,
                 int(voters.min()), first_few(capped))
    if len(csvs) > 255:
        raise TwostageError(f"hard voting counts votes in 8 bits: at most 255 CSVs, got {len(csvs)}")
    need_t = torch.as_tensor(need, dtype=torch.uint8, device=dev)[:, None]
    rows_of = [_rows_of(classes, ix.classes) for ix in indexes]

    with CsvWriter(out, classes) as writer:
        for name in tqdm(indexes[0].order, desc="ensemble", unit="img", disable=None):
            rows = [ix.rows(name) for ix in indexes]
            length = max(1, max(_rle_end(r) for rs in rows for r in rs.values()))
            votes = torch.zeros((len(classes), length), dtype=torch.uint8, device=dev)
            for ix, rs, where in zip(indexes, rows, rows_of):
                stack = np.stack([_decode_flat(rs[c], length, f"{ix.path}: image {name} class {c}")
                                  for c in ix.classes])
                votes[where] += torch.from_numpy(stack).to(dev)
            writer.add(name, encode_masks((votes >= need_t)[:, None, :]))
    return EnsembleSummary(out=str(out), mode="hard", images=len(indexes[0].order), inputs=inputs,
                           classes=classes, rule={c: int(n) for c, n in zip(classes, need)},
                           seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- soft voting

def _probs_files(folder: Path) -> dict[str, Path]:
    """{image_name: file} of a --save-probs folder (file = PNG stem + .npz)."""
    if not folder.is_dir():
        raise TwostageError(f"{folder}: no such probabilities folder (write one with `twostage infer --save-probs`)")
    files = {p.stem + ".png": p for p in sorted(folder.glob("*.npz")) if not p.name.startswith(".")}
    if not files:
        raise TwostageError(f"{folder}: no .npz probability files (write them with `twostage infer --save-probs`)")
    return files


def average_probs(folders: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  weights: Sequence[float] | None = None, thresholds=None, device: str = "cpu",
                  images: str | os.PathLike | None = None) -> EnsembleSummary:
    """Soft voting: the weighted mean of saved probabilities, per-class thresholds, one CSV.

    p_c = Σ_k w_k·p_k,c / Σ_k w_k over the inputs k that have class c; mask = p_c > t_c.

    Args:
        folders: one or more `infer --save-probs` folders over the same images.
        out: the CSV to write, atomically.
        weights: one non-negative weight per folder (default equal).
        thresholds: per-class thresholds as `twostage.fusion.thresholds` reads them (a number,
            {class: t} or a YAML file; default 0.5).
        device: torch device the mean and the thresholds run on.
        images: optional dataset or image folder: its sorted path order is the CSV order (and
            its image set must match); by default images are sorted by name.
    """
    from tqdm import tqdm

    from .. import fusion
    from ..inference.probs import probs_classes, read_probs
    from ..rle import CsvWriter, encode_masks

    t0 = time.perf_counter()
    folders = [Path(f) for f in folders]
    weights = _soft_weights(folders, weights)
    dev = torch_device(device)
    inputs = [str(f) for f in folders]
    files = [_probs_files(f) for f in folders]
    order = _image_order(inputs, files, images)
    first = [probs_classes(fs[order[0]]) for fs in files]
    classes = _output_classes(inputs, first)
    wsum = _class_weight_sums(classes, weights, first)
    thr = fusion.thresholds(thresholds)[[CLASS_TO_INDEX[c] for c in classes]].to(dev)
    norm = torch.as_tensor(1.0 / wsum, dtype=torch.float32, device=dev)[:, None, None]
    rows_of = [_rows_of(classes, cl) for cl in first]

    acc = None  # acc and the read buffers are reused while the image size stays
    buffers: list[np.ndarray | None] = [None] * len(files)
    with CsvWriter(out, classes) as writer:
        for name in tqdm(order, desc="ensemble", unit="img", disable=None):
            for k, fs in enumerate(files):
                cl, p = read_probs(fs[name], out=buffers[k])
                buffers[k] = p
                if cl != first[k]:
                    raise TwostageError(f"{fs[name]}: classes differ from the other files of {folders[k]}")
                if k == 0:
                    if acc is None or tuple(acc.shape[1:]) != tuple(p.shape[1:]):
                        acc = torch.zeros((len(classes), *p.shape[1:]), dtype=torch.float32, device=dev)
                    else:
                        acc.zero_()
                elif tuple(p.shape[1:]) != tuple(acc.shape[1:]):
                    raise TwostageError(f"{fs[name]}: probabilities are {p.shape[1]}x{p.shape[2]}, "
                                        f"{files[0][name]} has {acc.shape[1]}x{acc.shape[2]}")
                acc[rows_of[k]] += torch.from_numpy(p).to(dev).mul_(float(weights[k]))
            writer.add(name, encode_masks(acc.mul_(norm), thr))  # thresholds inside the RLE pass
    return EnsembleSummary(out=str(out), mode="soft", images=len(order), inputs=inputs, classes=classes,
                           rule={c: float(t) for c, t in zip(classes, thr.cpu().tolist())},
                           seconds=time.perf_counter() - t0)


def _soft_weights(folders: list[Path], weights: Sequence[float] | None) -> list[float]:
    """One non-negative weight per --probs folder (default equal), with a positive sum."""
    if not folders:
        raise TwostageError("soft voting needs at least one --probs folder")
    if weights is None:
        weights = [1.0] * len(folders)
    if len(weights) != len(folders):
        raise TwostageError(f"--weights: {len(weights)} value(s) for {len(folders)} --probs folder(s); give one each")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise TwostageError(f"--weights {list(weights)}: must be non-negative with a positive sum")
    return list(weights)


def _image_order(inputs: list[str], files: list[dict[str, Path]], images: str | os.PathLike | None) -> list[str]:
    """The CSV's image order: the dataset's sorted paths with --images, else sorted names; every
    input must hold the same images."""
    _check_same_images(inputs, [set(fs) for fs in files])
    if images is None:
        return sorted(files[0])
    from ..data.layout import find_samples

    order = [s.name for s in find_samples(images)]
    _check_same_images([str(images)] + inputs[:1], [set(order), set(files[0])])
    return order


def _class_weight_sums(classes: list[str], weights: list[float], first: list[list[str]]) -> np.ndarray:
    """Σ_k w_k per output class over the inputs that have it; a class no weight reaches is an error."""
    wsum = np.zeros(len(classes))
    for w, cl in zip(weights, first):
        wsum[[classes.index(c) for c in cl]] += w
    if (wsum == 0).any():
        zero = [c for c, s in zip(classes, wsum) if s == 0]
        raise TwostageError(f"--weights: classes {first_few(zero)} get total weight 0 (every input having them has weight 0)")
    return wsum
