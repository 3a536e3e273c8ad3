"""`twostage infer`: images → `chain.TwoStage` → RLE CSV (docs/DESIGN.md §2, §3).

The chain keeps the global probabilities at the network's size: the palm box is found
there, `upsample.threshold_upsample` upsamples only the source-size tiles that can cross a
threshold (a bone covers a few per cent of a radiograph), and only the palm box region of
the palm channels is upsampled, blended and thresholded. No 29-class source-size float stack
exists unless `--save-probs` asks for one. Images are read one batch ahead in a thread and
uploaded to the device once per batch (global model, palm crops and upscaler read that copy;
the palm crops of a batch share one palm forward); each image's RLE is made in a thread while
the next image is computed; the CSV is streamed through `twostage.rle.CsvWriter`, so it
appears only when every image succeeded.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..classes import CLASSES
from ..data.layout import Sample, find_samples, shard_slice
from ..devices import out_of_memory_as_error
from ..errors import TwostageError
from ..io.images import read_image
from ..io.locks import run_lock
from ..sr.upscale import tile_hint
from .chain import Segmentation, TwoStage
from .probs import probs_file_name, write_probs

log = logging.getLogger(__name__)

STAGES = ("read", "global", "box_crop", "masks", "upscale", "palm", "fusion", "save_probs", "rle_write")
"""Timed steps of the pipeline, reported in `InferSummary.timings` (seconds, summed)."""

@dataclass
class InferSummary:
    """What an `infer` run did: the CSV, counts, skipped images and where the time went."""

    out: str
    images: int
    fused: bool
    device: str
    seconds: float
    setup_s: float = 0.0  # building the chain: imports, checkpoints, networks, upscaler weights
    skipped: list[str] = field(default_factory=list)  # --skip-bad: images written as empty masks
    boxes: dict[str, list[int]] = field(default_factory=dict)  # fused runs: name -> [x0, y0, side]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _Clock:
    """Sums wall time per pipeline step; synchronises CUDA so GPU work lands in its own step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device  # synchronize this one: with --device cuda:1 the current device is still 0
        self.totals = dict.fromkeys(STAGES, 0.0)
        self._t = time.perf_counter()
        self.last = "read"  # the step that finished last

    def lap(self, stage: str) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.totals[stage] += now - self._t
        self._t, self.last = now, stage


def _read_batches(samples: list[Sample], batch_size: int, skip_bad: bool
                  ) -> Iterator[list[tuple[Sample, np.ndarray | TwostageError]]]:
    """Batches of (sample, image) with one batch read ahead in a thread (IO overlaps compute).
    A batch never mixes image sizes; an unreadable image is its error with `skip_bad`, else raises."""

    def read(s: Sample) -> tuple[Sample, np.ndarray | TwostageError]:
        try:
            return s, read_image(s.image_path)
        except TwostageError as e:
            if not skip_bad:
                raise
            return s, e

    def groups() -> Iterator[list[Sample]]:
        for k in range(0, len(samples), batch_size):
            yield samples[k:k + batch_size]

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for group in groups():
            future = pool.submit(lambda g=group: [read(s) for s in g])
            if pending is not None:
                yield from _split_by_shape(pending.result())
            pending = future
        if pending is not None:
            yield from _split_by_shape(pending.result())


def _split_by_shape(items: list[tuple[Sample, np.ndarray | TwostageError]]
                    ) -> Iterator[list[tuple[Sample, np.ndarray | TwostageError]]]:
    """Consecutive runs of equal image shape (unreadable images alone), order kept."""
    run: list = []
    for s, img in items:
        if run and (not isinstance(img, np.ndarray) or not isinstance(run[0][1], np.ndarray)
                    or run[0][1].shape != img.shape):
            yield run
            run = []
        run.append((s, img))
    if run:
        yield run


def find_images(images: str | os.PathLike, split: str | None = None,
                shard: str | Sequence[int] = (0, 1)) -> list[Sample]:
    """The images infer predicts: a folder of PNGs (recursive) or a dataset root (its test split
    unless `split` says otherwise), sharded; names must be unique (CSV rows are keyed by them)."""
    if split is None and (Path(images) / "test" / "DCM").is_dir():
        split = "test"
    samples = shard_slice(find_samples(images, split), shard)
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise TwostageError(f"{images}: image names repeat ({', '.join(dup)}); CSV rows are keyed by file name")
    return samples


BACKENDS = ("pytorch", "onnxruntime")
"""What computes the networks: PyTorch (checkpoints) or ONNX Runtime (a `twostage export` folder)."""


def infer(images: str | os.PathLike, global_ckpt: str | os.PathLike | None, out: str | os.PathLike, *,
          palm_ckpt: str | os.PathLike | None = None, fuse: bool = False, exported: str | os.PathLike | None = None,
          backend: str | None = None, batch_size: int = 1, save_probs: str | os.PathLike | None = None,
          shard: str | Sequence[int] = (0, 1), skip_bad: bool = False, split: str | None = None,
          **options) -> InferSummary:
    """Segment every image under IMAGES and write the submission CSV to `out` (atomically).

    Args:
        images: a folder of PNGs (searched recursively) or a dataset root (its test/DCM, or
            train/DCM if it has no test split; `split` picks one explicitly).
        global_ckpt: checkpoint (or run folder) of a global model predicting all 29 CLASSES
            (None with `exported`).
        out: the CSV; written only if every image succeeds (an existing file is untouched).
        palm_ckpt, fuse: with `fuse`, blend the palm model's predictions into the
            global ones inside the palm box (docs/DESIGN.md §3); without, the global model alone.
        exported, backend: a `twostage export` folder instead of checkpoints, run by ONNX Runtime
            (`backend` "onnxruntime"; "pytorch", the default, runs checkpoints). It is the whole
            chain: fused when it holds a palm network, with its recorded settings.
        batch_size: images per global forward pass (same-size images only).
        save_probs: folder; also write per-image uint8 probabilities (`probs.write_probs`).
        shard: "i/n": process only the i-th of n contiguous slices of the sorted images.
        skip_bad: write empty masks for images that are unreadable or fail inside the chain
            (out of memory on that image, say; listed in the summary) instead of stopping the run.
        options: `chain.ChainOptions` fields (device, fp16, tta, thresholds, fuse_weights,
            feather, palm_resize, upscaler_tile, ...); with `exported` only device,
            upscaler_tile (0: the recorded one) and accumulate.
    """
    if backend not in (None, *BACKENDS):
        raise TwostageError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if exported is not None:
        from .onnx_backend import check_runtime_options, exported_chain

        if backend == "pytorch" or global_ckpt is not None or palm_ckpt is not None or fuse:
            raise TwostageError("--exported DIR is the whole chain, run by --backend onnxruntime: leave out --global, "
                                "--palm, --fuse and --backend pytorch (it fuses when DIR holds a palm network)")
        check_runtime_options(options, exported)
        _check_run(out, batch_size)
        samples = find_images(images, split, shard)
        t0 = time.perf_counter()
        chain = exported_chain(exported, options.get("device", "cpu"), options.get("upscaler_tile") or None,
                               options.get("accumulate", "device"))
        return _timed_run(chain, samples, out, time.perf_counter() - t0, batch_size=batch_size,
                          save_probs=save_probs, skip_bad=skip_bad)
    if backend == "onnxruntime":
        raise TwostageError("--backend onnxruntime runs an exported chain: give --exported DIR (make it with "
                            "`twostage export`)")
    if global_ckpt is None:
        raise TwostageError("give --global CKPT or --exported DIR")
    if fuse and palm_ckpt is None:
        raise TwostageError("--fuse needs a palm checkpoint (--palm CKPT)")
    if not fuse and palm_ckpt is not None:
        log.info("--palm given without --fuse: running the global model alone")
    _check_run(out, batch_size)
    samples = find_images(images, split, shard)
    t0 = time.perf_counter()
    chain = TwoStage.build(global_ckpt, palm_ckpt if fuse else None, **options)
    return _timed_run(chain, samples, out, time.perf_counter() - t0, fuse=fuse, batch_size=batch_size,
                      save_probs=save_probs, skip_bad=skip_bad)


def _timed_run(chain: TwoStage, samples: list[Sample], out, setup: float, **kw) -> InferSummary:
    """`run`, its summary carrying the `setup` seconds it took to build the chain."""
    log.info("chain built in %.1f s", setup)
    summary = run(chain, samples, out, **kw)
    summary.setup_s = setup
    return summary


def _check_run(out: str | os.PathLike, batch_size: int) -> None:
    if batch_size < 1:
        raise TwostageError(f"--batch-size {batch_size}: must be at least 1")
    if Path(out).is_dir():
        raise TwostageError(f"{out}: is a folder; --out takes the CSV file to write")


_NEXT_STEP = {"box_crop": "upscale", "upscale": "palm"}
"""The step of `TwoStage.palm_regions` running after the last one the clock saw finish (per
image, `TwoStage.segment` then runs masks and fusion)."""


def _lower(step: str, chain: TwoStage, size: tuple[int, int]) -> str:
    """What to lower when `step` runs out of memory."""
    tta = ", or leave out --tta" if chain.options.hflip else ""
    if step == "upscale":
        return tile_hint(chain.options.upscaler_tile)
    if step == "palm":
        return f"the palm model's input size (model.input_size, set when training it){tta}"
    return f"the image size ({size[1]}x{size[0]}: its source-size masks are made on the device) or use --device cpu"


class _Skipper:
    """--skip-bad: an image that fails (unreadable, or failing inside the chain) is listed in
    `skipped` and handed to `on_skip` (infer writes empty masks for it); without --skip-bad the
    error stops the run."""

    def __init__(self, enabled: bool, skipped: list[str], on_skip=None):
        self.enabled, self.skipped, self.on_skip = enabled, skipped, on_skip

    def skip(self, sample: Sample, what: str, error: TwostageError) -> None:
        reason = str(error).removeprefix(f"{sample.image_path}: ")
        log.warning("%s: %s (%s); writing empty masks (--skip-bad)", sample.image_path, what, reason)
        self.skipped.append(str(sample.image_path))
        self.on_skip(sample)


def _predict(chain: TwoStage, batch: list[tuple[Sample, np.ndarray]], fused: bool, clock: _Clock,
             boxes_out: dict[str, list[int]], skipper: _Skipper) -> Iterator[tuple[Sample, Segmentation, torch.Tensor]]:
    """The global model on one batch of same-size images, then the rest of the chain per image,
    yielding each (sample, segmentation, network-size probabilities). An allocation failure is
    an error naming the step; with --skip-bad a failing batch is retried image by image and
    only the images that fail alone are skipped. Fused runs record each palm box in `boxes_out`."""
    names, size = [s.name for s, _ in batch], batch[0][1].shape
    tta = ", or leave out --tta" if chain.options.hflip else ""
    regions = [None] * len(batch)
    try:
        with out_of_memory_as_error(f"infer: the global model ({len(batch)} image(s) of {size[1]}x{size[0]} "
                                    f"on {chain.device})", f"--batch-size (now {len(batch)}){tta}"):
            # uploaded once: the global model, the palm crops and the upscaler read the same copy
            images = torch.from_numpy(np.stack([img for _, img in batch])).to(chain.device)
            native = chain.native(images)  # (B, C, h, w) at the network's size
            clock.lap("global")
            boxes = chain.boxes(native, names, size) if fused else [None] * len(batch)
        if fused:
            boxes_out.update({n: [int(b.x0), int(b.y0), int(b.side)] for n, b in zip(names, boxes)})
            clock.lap("box_crop")
            with out_of_memory_as_error(lambda: f"infer: the {_NEXT_STEP[clock.last]} step of {len(batch)} image(s) "
                                                f"({size[1]}x{size[0]}) on {chain.device}",
                                        lambda: _lower(_NEXT_STEP[clock.last], chain, size)):
                regions = chain.palm_regions(images, boxes, clock.lap)
        del images
    except TwostageError as e:
        if not skipper.enabled:
            raise
        if len(batch) == 1:
            skipper.skip(batch[0][0], "failed in the global model", e)
        else:
            for item in batch:
                yield from _predict(chain, [item], fused, clock, boxes_out, skipper)
        return
    for b, ((sample, image), box) in enumerate(zip(batch, boxes)):
        def step() -> str:
            return "fusion" if clock.last == "masks" else "masks"

        try:
            with out_of_memory_as_error(lambda: f"infer: the {step()} step of {sample.name} ({size[1]}x{size[0]}) "
                                                f"on {chain.device}", lambda: _lower(step(), chain, size)):
                seg = chain.segment(native[b], image, box, fused, clock.lap, region=regions[b])
                regions[b] = None
        except TwostageError as e:
            if not skipper.enabled:
                raise
            skipper.skip(sample, "failed in the chain", e)
            continue
        yield sample, seg, native[b]
        del seg
    del native


def _segment_all(chain: TwoStage, samples: list[Sample], fused: bool, batch_size: int, clock: _Clock,
                 boxes_out: dict[str, list[int]], skipper: _Skipper
                 ) -> Iterator[tuple[Sample, Segmentation, torch.Tensor]]:
    """`_predict` over every batch of `samples`, read one batch ahead; unreadable images go to `skipper`."""
    for batch in _read_batches(samples, batch_size, skipper.enabled):
        clock.lap("read")
        if isinstance(batch[0][1], TwostageError):
            skipper.skip(batch[0][0], "unreadable", batch[0][1])
            continue
        yield from _predict(chain, batch, fused, clock, boxes_out, skipper)


def predictions(chain: TwoStage, samples: list[Sample], *, fuse: bool = True, batch_size: int = 1
                ) -> Iterator[tuple[Sample, Segmentation, torch.Tensor]]:
    """Each image's (sample, `chain.Segmentation`, (C, h, w) network-size probabilities), in
    order, exactly as `run` computes them (same batching, read-ahead and out-of-memory errors);
    any failure raises. `chain.full_probs(native, seg.masks.shape[-2:], seg)` gives the
    source-size probabilities. Drop the references to each result before asking for the next:
    the generator frees its own."""
    yield from _segment_all(chain, samples, fuse and chain.palm is not None, batch_size, _Clock(chain.device), {},
                            _Skipper(False, []))


def run(chain: TwoStage, samples: list[Sample], out: str | os.PathLike, *, fuse: bool = True,
        batch_size: int = 1, save_probs: str | os.PathLike | None = None, skip_bad: bool = False) -> InferSummary:
    """`infer` with a built chain on chosen samples (evaluate runs one chain twice: fused and not).
    `fuse` applies when the chain has a palm stage. The CSV (and the `save_probs` folder) is
    locked while the run writes it: a second run into the same output is refused."""
    from tqdm import tqdm

    from ..rle import CsvWriter, encode_masks

    _check_run(out, batch_size)
    t_start = time.perf_counter()
    fused = fuse and chain.palm is not None
    summary = InferSummary(out=str(out), images=len(samples), fused=fused, device=str(chain.device), seconds=0.0)
    clock = _Clock(chain.device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_lock(out, "twostage infer"))
        if save_probs is not None:
            stack.enter_context(run_lock(save_probs, "twostage infer --save-probs"))
        bar = stack.enter_context(tqdm(total=len(samples), desc="infer", unit="img", disable=None))
        writer = stack.enter_context(CsvWriter(out))
        # the RLE of one image is made in a thread while the next image is computed: on a GPU
        # the networks then never wait for it; rows reach the CSV in order
        encoder = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        pending: list = []  # (name, future RLE) of the image being encoded, at most one

        def flush() -> None:
            while pending:
                name, rles = pending.pop(0)
                writer.add(name, rles.result())
                bar.update(1)

        def skipped(sample: Sample) -> None:
            flush()
            writer.add(sample.name, [""] * len(CLASSES))
            bar.update(1)

        results = stack.enter_context(contextlib.closing(_segment_all(
            chain, samples, fused, batch_size, clock, summary.boxes, _Skipper(skip_bad, summary.skipped, skipped))))
        for sample, seg, native in results:
            if save_probs is not None:
                write_probs(Path(save_probs) / probs_file_name(sample.name),
                            chain.full_probs(native, tuple(seg.masks.shape[-2:]), seg))
                clock.lap("save_probs")
            flush()
            pending.append((sample.name, encoder.submit(encode_masks, seg.masks, rows=seg.rows)))
            clock.lap("rle_write")
            del seg, native  # freed (once encoded) before the next image is computed
        flush()
        clock.lap("rle_write")
    summary.timings, summary.seconds = clock.totals, time.perf_counter() - t_start
    log.info("seconds per image by step: %s",
             {k: round(v / max(1, len(samples)), 4) for k, v in summary.timings.items() if v})
    if summary.skipped:
        log.warning("%d image(s) unreadable or failing in the chain, written as empty masks: %s",
                    len(summary.skipped), ", ".join(summary.skipped))
    return summary
