"""Upscaler throughput and peak memory, side by side: bicubic vs RRDBNet x4 vs SRVGGNetCompact x4.

The networks have the official architectures and sizes (from weights/manifest.yaml) with
random-init weights (speed and memory do not depend on the weight values), run through
`twostage.sr.upscale.make_upscaler` exactly as prepare-sr runs them. Each configuration runs in its
own subprocess so its peak memory is its own: ru_maxrss of that process on CPU (tracemalloc
does not see torch's allocations), torch.cuda.max_memory_allocated on CUDA.

    .venv/bin/python benchmarks/sr.py                  # 512² crops, tiles 0/256/512, CPU
    .venv/bin/python benchmarks/sr.py --size 128       # what fits a 2-core laptop in minutes
    .venv/bin/python benchmarks/sr.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rehearsal_2048 import make_rrdb_weights  # random official-architecture weights

UPSCALERS = ("bicubic", "RealESRGAN_x4plus", "realesr-general-x4v3")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(name: str, tile: int, size: int, device: str, repeats: int) -> dict:
    """Build one upscaler, time `repeats` crops after a warm-up; returns the measurements."""
    import numpy as np
    import torch

    from twostage.sr.upscale import make_upscaler

    with tempfile.TemporaryDirectory() as d:
        kwargs = {}
        if name != "bicubic":
            make_rrdb_weights(Path(d), (name,))
            kwargs = {"weights_dir": d}
        up = make_upscaler(name, scale=4 if name == "bicubic" else None, tile=tile, device=device, **kwargs)
    img = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    base_rss = _maxrss_mb()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    up(img)  # warm-up
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = up(img)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / repeats
    assert out.shape == (size * up.scale, size * up.scale)
    res = {"upscaler": name, "tile": tile, "size": size, "s_per_crop": dt, "crops_per_s": 1 / dt,
           "rss_before_mb": base_rss, "peak_rss_mb": _maxrss_mb()}
    if cuda:
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="crop side in px (default 512)")
    p.add_argument("--tiles", default="0,256,512", help="comma-separated tile sizes (0 = no tiling)")
    p.add_argument("--upscalers", default=",".join(UPSCALERS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--worker", nargs=2, metavar=("NAME", "TILE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.size, a.device, a.repeats)))
        return 0
    rows = []
    print(f"{'upscaler':<22}{'tile':>6}{'crop':>7}{'s/crop':>10}{'crops/s':>10}{'peak RSS MB':>13}"
          f"{'(base)':>9}" + ("  cuda peak MB" if a.device.startswith("cuda") else ""), flush=True)
    for name in a.upscalers.split(","):
        for tile in [int(t) for t in a.tiles.split(",")]:
            if name == "bicubic" and tile:
                continue  # bicubic does not tile
            cmd = [sys.executable, __file__, "--worker", name, str(tile), "--size", str(a.size),
                   "--device", a.device, "--repeats", str(a.repeats)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append(r)
            extra = f"  {r['cuda_peak_mb']:12.0f}" if "cuda_peak_mb" in r else ""
            print(f"{name:<22}{tile:>6}{a.size:>7}{r['s_per_crop']:>10.3f}{r['crops_per_s']:>10.2f}"
                  f"{r['peak_rss_mb']:>13.0f}{r['rss_before_mb']:>9.0f}{extra}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
