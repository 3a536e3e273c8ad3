"""Benchmark: sliding-window inference vs the sum of its window forwards (the blending
overhead), and the peak memory of a 2048² image with the output accumulated on the CPU.

Side by side in one run, on the same random-init network (Unet + EfficientNet-Lite0, the demo's,
29 classes): `window.sliding_window` over a (1, 3, S, S) input with --window windows and
--overlap, the same windows' forwards alone (the input cut into the same windows, each sent
through the network, outputs discarded), and, where `monai` is installed, MONAI's
`sliding_window_inference` with the same windows and Gaussian map (what twostage used before
its own). The overhead is a ratio to the forwards alone − 1 (target ≤ 10 %); since that
difference is within the machine's noise, each is also run with a no-op network (the blending
alone: window cutting, weighting, accumulation, normalisation) as a share of the forwards.
Then, in a fresh child process each, the peak RSS of `sliding_window` over S² with the output
accumulated on the CPU vs a forward of one window of the same input (what the network alone needs).

    .venv/bin/python benchmarks/window.py                      # 2048², windows 512, overlap 0.5
    .venv/bin/python benchmarks/window.py --size 1024 --window 256 --repeat 1
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from twostage.models import build_model
from twostage.window import gaussian_map, sliding_window, window_starts


def monai_sliding_window(x, predict, window: int, overlap: float, batch: int):
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(x, (window, window), batch, predict, overlap=overlap, mode="gaussian",
                                    sw_device=x.device, device="cpu",
                                    roi_weight_map=gaussian_map((window, window), str(x.device)))


def _net(classes: int = 29) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("Unet", "tu-efficientnet_lite0", classes, 3).eval()


@torch.no_grad()
def overhead(size: int, window: int, overlap: float, repeat: int, batch: int) -> None:
    net = _net()
    x = torch.randn(1, 3, size, size)
    starts = window_starts(size, window, overlap)
    origins = [(y, x0) for y in starts for x0 in starts]
    predict = lambda w: torch.sigmoid(net(w))  # noqa: E731

    def forwards() -> float:
        t = time.perf_counter()
        for k in range(0, len(origins), batch):
            w = torch.cat([x[..., y:y + window, x0:x0 + window] for y, x0 in origins[k:k + batch]])
            torch.sigmoid(net(w))
        return time.perf_counter() - t

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def no_net(w):  # the blending alone; zeros: an output is written, as the network writes its own
        return torch.zeros(w.shape[0], 29, *w.shape[-2:])  # (torch.empty's garbage holds denormals: slow)

    runs = {"forwards": forwards,
            "sliding_window": lambda: timed(lambda: sliding_window(x, predict, (window, window), overlap,
                                                                     batch=batch, out_device="cpu")),
            "sliding_window blending alone": lambda: timed(lambda: sliding_window(
                x, no_net, (window, window), overlap, batch=batch, out_device="cpu"))}
    try:
        import monai  # noqa: F401
        runs["MONAI"] = lambda: timed(lambda: monai_sliding_window(x, predict, window, overlap, batch))
        runs["MONAI blending alone"] = lambda: timed(lambda: monai_sliding_window(x, no_net, window, overlap, batch))
        ours = sliding_window(x, predict, (window, window), overlap, batch=batch, out_device="cpu")
        diff = float((ours - monai_sliding_window(x, predict, window, overlap, batch)).abs().max())
    except ImportError:
        diff = None
    for name, fn in runs.items():  # warm-up: imports, allocator
        if name != "forwards":
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeat):  # interleaved: the machine's noise hits all alike
        for name, fn in runs.items():
            times[name].append(fn())
    best = {name: min(t) for name, t in times.items()}
    print(f"{size}² image, {len(origins)} windows of {window}² (overlap {overlap}), batch {batch}, "
          f"{repeat} run(s), best of each")
    print(f"  window forwards alone: {best['forwards']:.2f} s")
    for name in runs:
        if name.endswith("blending alone"):
            print(f"  {name} (a no-op network): {best[name]:.2f} s = {best[name] / best['forwards']:.1%} of the "
                  "forwards")
        elif name != "forwards":
            print(f"  {name}: {best[name]:.2f} s, overhead {best[name] / best['forwards'] - 1:+.1%}")
    if diff is None:
        print("  (MONAI not installed: `pip install monai` to compare with its sliding_window_inference)")
    else:
        print(f"  largest difference between the two blended outputs: {diff:.1e}")


CHILD = """
import sys, torch
from twostage.window import sliding_window
from twostage.models import build_model
size, window, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
net = build_model("Unet", "tu-efficientnet_lite0", 29, 3).eval()
x = torch.randn(1, 3, size, size)
with torch.no_grad():
    if mode == "window":
        torch.sigmoid(net(x[..., :window, :window]))
    else:
        out = sliding_window(x, lambda w: torch.sigmoid(net(w)), (window, window), 0.5, batch=1, out_device="cpu")
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def peak_memory(size: int, window: int) -> None:
    out = {}
    for mode in ("window", "sliding"):
        r = subprocess.run([sys.executable, "-c", CHILD, str(size), str(window), mode], capture_output=True,
                           text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        out[mode] = int(r.stdout.split()[-1]) / 1024
    floats = 29 * size * size * 4 / 2**20
    print(f"peak RSS of the process, {size}² input with the output on the CPU: one {window}² window forward "
          f"{out['window']:.0f} MiB; sliding_window over the image {out['sliding']:.0f} MiB, "
          f"+{out['sliding'] - out['window']:.0f} MiB (the 29-class float32 output alone is {floats:.0f} MiB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    overhead(a.size, a.window, a.overlap, a.repeat, a.batch)
    peak_memory(a.size, a.window)


if __name__ == "__main__":
    main()
