"""Run-length encoding and the prediction CSV of docs/DESIGN.md §2: the one place the RLE lives.

RLE: the H×W mask is flattened row-major, padded with one 0 at both ends, and every change
is a boundary; runs are written as `start length` pairs with 1-based starts, joined by single
spaces; an empty mask is "". `encode_masks` is byte-identical to the competition formula

    pixels = np.concatenate([[0], mask.flatten(), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1; runs[1::2] -= runs[::2]
    " ".join(str(x) for x in runs)

but works on all classes of an image at once, on the masks' own device (CUDA included):
only the boundary indices travel to the CPU, and the strings are formatted without a
Python loop per run.

CSV: header `image_name,class,rle`, one row per image per class in class order, images in
the order the caller adds them (sorted path order, see `twostage.data.layout.find_samples`).
"""
from __future__ import annotations

import contextlib
import csv
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .classes import CLASSES
from .errors import TwostageError
from .io.files import atomic_path

CSV_HEADER = ("image_name", "class", "rle")
CSV_FIELD_LIMIT = 2**31 - 1
"""Longest CSV field read: the RLE of one class of a large or noisy mask is far beyond the
csv module's default of 128 KiB (a 2048² checkerboard is 26 MB); memory stays bounded by the file."""

_POW10 = 10 ** np.arange(19, dtype=np.int64)  # 1 .. 1e18: digit counts of int64 values ≥ 1
_INT_TOKEN = re.compile(r"-?[0-9]+")
_CPU_BLOCK = 1 << 20  # pixels per block of the CPU boundary search


# --------------------------------------------------------------------------- encoding

def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _spans(rows: np.ndarray, width: int, n: int) -> list[tuple[int, int]]:
    """Flat [a, b) ranges covering the runs of True `rows` of one channel, one known-background
    pixel beyond each end included so boundaries at the edges are found."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], rows, [False]]).astype(np.int8)))
    return [(max(0, int(r0) * width - 1), min(n, int(r1) * width + 1)) for r0, r1 in edges.reshape(-1, 2)]


def _boundaries(masks: Any, thresholds: Any = None,
                rows: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Find where the foreground changes, on the masks' device, in one pass over all channels.

    Args:
        masks: (C, H, W) numpy array or torch tensor.
        thresholds: None (nonzero is foreground) or (C,) values: foreground is
            masks[c] > thresholds[c], compared in the masks' dtype (the rule of
            `twostage.fusion.binarize`), so probabilities are encoded without a bool copy.
        rows: None or (C, H) bool, False for rows known to hold no foreground: on the CPU
            those rows are not read (the hint `upsample.threshold_upsample` gives).
    Returns:
        (inner, first, last, C, N) on the CPU: `inner` are indices k into the flattened
        (C·N) stack where pixel k+1 differs from pixel k (channel junctions may be included,
        the caller drops them); `first`/`last` (C,) bool say whether each channel's first/last
        pixel is foreground (a boundary against the zero padding).
    """
    if masks.ndim != 3:
        raise ValueError(f"expected (C, H, W) masks, got shape {tuple(masks.shape)}")
    c = int(masks.shape[0])
    n = int(masks.shape[1]) * int(masks.shape[2])
    if thresholds is not None and len(thresholds) != c:
        raise ValueError(f"{len(thresholds)} thresholds for {c} channels")
    if _is_torch(masks) and masks.device.type == "cpu" and str(masks.dtype) != "torch.bfloat16":
        masks = masks.detach().numpy()  # zero-copy; numpy's compare + flatnonzero beat torch's on CPU
    if _is_torch(masks):
        import torch

        flat = masks.reshape(c, n)
        if thresholds is not None:
            thr = torch.as_tensor(thresholds).to(flat.device, flat.dtype)
            flat = flat > thr[:, None]
        elif flat.dtype != torch.bool:
            flat = flat != 0
        inner = torch.nonzero(flat.reshape(-1)[1:] != flat.reshape(-1)[:-1]).reshape(-1)
        ends = flat[:, [0, -1]]
        return inner.cpu().numpy(), *ends.cpu().numpy().T, c, n
    flat = np.ascontiguousarray(masks).reshape(c, n)
    if thresholds is not None:
        if _is_torch(thresholds):
            thresholds = thresholds.detach().cpu().numpy()
        thr = np.asarray(thresholds).astype(flat.dtype)
        ends = flat[:, [0, -1]] > thr[:, None]
    else:
        thr = None
        ends = flat[:, [0, -1]] != 0
    # Blocks that stay in cache, each skipped after one read when it holds no foreground
    # (most of a 2048² bone channel): about 2x faster than comparing and diffing everything.
    fg = np.empty(min(n, _CPU_BLOCK + 1), np.bool_)
    change = np.empty(fg.size, np.bool_)
    inner = []
    if rows is not None:
        rows = rows.detach().cpu().numpy() if _is_torch(rows) else np.asarray(rows)
        if rows.shape != tuple(masks.shape[:2]):
            raise ValueError(f"row hint of shape {rows.shape} for masks of shape {tuple(masks.shape)}")
    width = int(masks.shape[2])
    for ch in range(c):
        row = flat[ch]
        for lo, hi in [(0, n)] if rows is None else _spans(rows[ch], width, n):
            for start in range(lo, hi - 1, _CPU_BLOCK):
                block = row[start:min(start + _CPU_BLOCK, hi - 1) + 1]
                if thr is None:
                    if not block.any():
                        continue
                    f = block if block.dtype == np.bool_ else np.not_equal(block, 0, out=fg[:block.size])
                else:
                    if block.max() <= thr[ch]:  # a NaN maximum is not <=: such a block is compared
                        continue
                    f = np.greater(block, thr[ch], out=fg[:block.size])
                d = np.not_equal(f[1:], f[:-1], out=change[:block.size - 1])
                inner.append(np.flatnonzero(d) + (ch * n + start))
    return np.concatenate(inner) if inner else np.zeros(0, np.int64), ends[:, 0], ends[:, 1], c, n


def _format_runs(values: np.ndarray, channel: np.ndarray, num_channels: int) -> list[str]:
    """Space-joined decimal strings of `values` (int64 ≥ 1) grouped by sorted `channel`.

    All digits are written into one byte buffer with numpy, so the cost does not grow with
    a Python loop per run (noisy predictions can have hundreds of thousands of runs).
    """
    out = [""] * num_channels
    if values.size == 0:
        return out
    ndigits = np.searchsorted(_POW10, values, side="right")
    sep = np.cumsum(ndigits + 1) - 1  # where each value's separator byte goes
    buf = np.full(int(sep[-1]) + 1, ord(" "), dtype=np.uint8)
    last_of_channel = np.append(channel[1:] != channel[:-1], True)
    buf[sep[last_of_channel]] = ord("\n")
    rest = values.copy()
    for d in range(int(ndigits.max())):
        live = ndigits > d
        buf[sep[live] - 1 - d] = ord("0") + rest[live] % 10
        rest //= 10
    lines = buf.tobytes().decode("ascii").split("\n")
    for ch, line in zip(channel[last_of_channel].tolist(), lines):
        out[ch] = line
    return out


def encode_masks(masks: Any, thresholds: Any = None, rows: Any = None) -> list[str]:
    """RLE strings of every channel of a (C, H, W) mask stack (bool/uint8/int/float, nonzero =
    foreground), numpy or torch on any device; byte-identical to the reference formula (docs/DESIGN.md §2).

    With (C,) `thresholds`, `masks` are probabilities and foreground is masks[c] > thresholds[c]:
    the same strings as `encode_masks(fusion.binarize(masks, thresholds))` without the
    full-size bool stack, and blocks below threshold are skipped after one read. `rows`, a
    (C, H) bool hint (False: the row holds no foreground), lets the CPU skip those rows unread."""
    inner, first, last, c, n = _boundaries(masks, thresholds, rows)
    inner = inner[inner % n != n - 1]  # a change between two channels is no boundary
    # boundary position i ∈ [0, N] of channel ch, as one sortable key ch·(N+1) + i
    keys = np.concatenate([
        inner + inner // n + 1,
        np.flatnonzero(first) * (n + 1),
        np.flatnonzero(last) * (n + 1) + n,
    ])
    keys.sort()
    channel, pos = np.divmod(keys, n + 1)
    pos = pos.reshape(-1, 2)
    runs = np.stack([pos[:, 0] + 1, pos[:, 1] - pos[:, 0]], axis=1).reshape(-1)
    return _format_runs(runs, channel, c)


def encode(mask: Any) -> str:
    """RLE string of one (H, W) mask (numpy or torch); "" for an empty mask."""
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {tuple(mask.shape)}")
    return encode_masks(mask[None])[0]


# --------------------------------------------------------------------------- decoding

def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0,1} mask from an RLE string; a malformed RLE is a TwostageError saying
    what is wrong (the caller adds the file and row)."""
    h, w = int(shape[0]), int(shape[1])
    n = h * w
    tokens = rle.split()
    if not tokens:
        return np.zeros((h, w), dtype=np.uint8)
    for t in tokens:
        if not _INT_TOKEN.fullmatch(t):
            raise TwostageError(f"RLE value {t[:20]!r} is not an integer")
    if len(tokens) % 2:
        raise TwostageError(f"RLE has an odd number of values ({len(tokens)}); expected start/length pairs")
    try:
        runs = np.array([int(t) for t in tokens], dtype=np.int64).reshape(-1, 2)
    except (OverflowError, ValueError):  # beyond int64, or beyond Python's 4300-digit int parsing
        raise TwostageError(f"RLE has a value out of range for a {h}x{w} image") from None
    starts, lengths = runs[:, 0], runs[:, 1]
    ends = starts - 1 + lengths  # exclusive, 0-based
    for bad, what in (
        (starts < 1, "starts at {s} (starts are 1-based, ≥ 1)"),
        (lengths < 1, "has length {l} (lengths must be ≥ 1)"),
        (ends > n, "(start {s}, length {l}) ends beyond the {h}x{w} image ({n} pixels)"),
    ):
        if bad.any():
            k = int(np.argmax(bad))
            raise TwostageError(f"RLE run {k + 1} " + what.format(s=starts[k], l=lengths[k], h=h, w=w, n=n))
    order = starts[1:] <= ends[:-1]
    if order.any():
        k = int(np.argmax(order)) + 1
        raise TwostageError(f"RLE run {k + 1} (start {starts[k]}) overlaps or precedes run {k} "
                            f"(pixels {starts[k - 1]}..{ends[k - 1]}); runs must be sorted and disjoint")
    # runs are sorted and disjoint: the mask is alternating 0-gaps and 1-runs
    counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
    counts[0:-1:2] = starts - 1 - np.concatenate([[0], ends[:-1]])
    counts[1::2] = lengths
    counts[-1] = n - ends[-1]
    values = np.zeros(len(counts), dtype=np.uint8)
    values[1::2] = 1
    return np.repeat(values, counts).reshape(h, w)


# --------------------------------------------------------------------------- CSV

def csv_reader(lines: Iterable[str]) -> Iterator[list[str]]:
    """`csv.reader(lines)` with fields up to CSV_FIELD_LIMIT characters."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    return csv.reader(lines)


class CsvWriter:
    """Stream the submission CSV to a temporary file, renamed onto `path` only if the block succeeds.

    `with CsvWriter(path) as w: w.add(image_name, rles)` — one `rles` string per class in
    `classes` order; images in the order added (the caller sorts), each at most once.
    """

    def __init__(self, path: str | os.PathLike, classes: Sequence[str] = CLASSES):
        self.path = Path(path)
        self.classes = tuple(classes)
        self._seen: set[str] = set()
        self._stack: contextlib.ExitStack | None = None
        self._writer: Any = None

    def __enter__(self) -> CsvWriter:
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.path))
            f = stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self._writer = csv.writer(f, lineterminator="\n")
        self._writer.writerow(CSV_HEADER)
        return self

    def add(self, image_name: str, rles: Sequence[str]) -> None:
        """Write the rows of one image: one RLE per class, in class order."""
        if self._stack is None:
            raise RuntimeError("CsvWriter.add called outside its `with` block")
        if image_name in self._seen:
            raise TwostageError(f"{self.path}: image {image_name!r} added twice (image names must be unique)")
        if "\r" in image_name or "\n" in image_name:  # csv quotes neither with our "\n" line end: unreadable rows
            raise TwostageError(f"{self.path}: image name {image_name!r} holds a line break; rename that file")
        if len(rles) != len(self.classes):
            raise TwostageError(f"{self.path}: image {image_name!r} has {len(rles)} RLEs, "
                                f"expected one per class ({len(self.classes)})")
        self._seen.add(image_name)
        self._writer.writerows((image_name, c, r) for c, r in zip(self.classes, rles))

    def __exit__(self, *exc: Any) -> bool:
        stack, self._stack, self._writer = self._stack, None, None
        return stack.__exit__(*exc)


def write_csv(path: str | os.PathLike, rows: Iterable[tuple[str, Sequence[str]]],
              classes: Sequence[str] = CLASSES) -> None:
    """Write (image_name, rles) rows as the submission CSV, atomically."""
    with CsvWriter(path, classes) as w:
        for name, rles in rows:
            w.add(name, rles)


def read_csv(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """{image_name: {class: rle}} from a submission CSV (any subset of classes; empty rle → "").

    Structure errors (missing or wrong header, wrong field count, a repeated image/class
    row, unreadable file) are TwostageErrors naming the file and line.
    """
    path = Path(path)
    out: dict[str, dict[str, str]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv_reader(f)
            header = next(reader, None)
            if header is None:
                raise TwostageError(f"{path}: empty file, expected the header {','.join(CSV_HEADER)}")
            if tuple(h.strip() for h in header) != CSV_HEADER:
                raise TwostageError(f"{path}:1: header is {','.join(header)!r}, expected {','.join(CSV_HEADER)!r}")
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) != 3:
                    raise TwostageError(f"{path}:{line}: {len(row)} fields, expected 3 ({','.join(CSV_HEADER)})")
                name, cls, rle = row
                per_image = out.setdefault(name, {})
                if cls in per_image:
                    raise TwostageError(f"{path}:{line}: second row for image {name!r} class {cls!r}")
                per_image[cls] = rle
    except OSError as e:
        raise TwostageError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise TwostageError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    except csv.Error as e:
        raise TwostageError(f"{path}: malformed CSV ({e})") from None
    return out
