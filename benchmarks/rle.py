"""RLE encoder vs the competition's reference formula on the 29 masks of a 2048² phantom hand.

Run: python benchmarks/rle.py [--size 2048] [--repeat 7]
Prints the median time of each encoder and the speed-up, measured side by side in one run,
and checks that every string is byte-identical to the reference.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from twostage.data.annotations import rasterize
from twostage.data.synth import render_hand
from twostage.rle import decode, encode_masks


def reference_rle(mask: np.ndarray) -> str:
    """The competition's encoder, verbatim (one class at a time)."""
    pixels = mask.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def median_ms(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    _, anns = render_hand(np.random.default_rng(0), args.size)
    masks = rasterize(anns, (args.size, args.size))
    print(f"masks {masks.shape} uint8, {int(masks.sum())} foreground pixels, torch threads {torch.get_num_threads()}")

    ref_ms, expected = median_ms(lambda: [reference_rle(m) for m in masks], args.repeat)
    n_runs = sum(len(s.split()) // 2 for s in expected)
    print(f"{'reference (per class)':28s} {ref_ms:8.1f} ms   ({n_runs} runs)")
    cases = [("encode_masks numpy uint8", masks), ("encode_masks numpy bool", masks.astype(bool)),
             ("encode_masks torch cpu", torch.from_numpy(masks))]
    if torch.cuda.is_available():
        cuda = torch.from_numpy(masks).cuda()
        encode_masks(cuda)  # warm-up: CUDA context and kernels
        cases.append(("encode_masks torch cuda", cuda))
    for name, x in cases:
        if x is not masks and getattr(x, "is_cuda", False):
            def fn(x=x):
                out = encode_masks(x)
                torch.cuda.synchronize()
                return out
        else:
            def fn(x=x):
                return encode_masks(x)
        ms, got = median_ms(fn, args.repeat)
        if got != expected:
            raise SystemExit(f"{name}: output differs from the reference")
        print(f"{name:28s} {ms:8.1f} ms   {ref_ms / ms:5.1f}x faster, identical strings")
    dec_ms, back = median_ms(lambda: [decode(s, masks.shape[1:]) for s in expected], args.repeat)
    if not all((b == m).all() for b, m in zip(back, masks)):
        raise SystemExit("decode does not invert the reference strings")
    print(f"{'decode (29 classes)':28s} {dec_ms:8.1f} ms")


if __name__ == "__main__":
    main()
