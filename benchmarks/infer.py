"""`twostage infer --fuse`, old chain against new, side by side in one run on the same inputs.

The old chain is the `twostage` package of a git revision (`--old`, default the last commit
before the inference rework), unpacked with `git archive`; the new one is this checkout. Each
runs in its own subprocess (alternating, `--rounds` times; the best round of each counts) on
the same phantoms and checkpoints and reports:
  * set-up: building the chain (checkpoint loading, weight hashing, model building) plus the
    first-call warm-up (the first image's time beyond a steady image's);
  * per image, steady state: the whole `infer.run` time, split into network forwards (every
    outermost `nn.Module` call: global, upscaler, palm network; CUDA synchronised around each)
    and everything else (read, resize, box, crop, transfers, upsample, fusion, RLE, CSV);
  * whether the two CSVs are byte-identical.
On CUDA, a run without the forward hooks (they synchronise) gives the throughput.

Models: the real stage architectures (stages/global.yaml, stages/palm.yaml; random weights,
made confident by benchmarks/device_compare.py so the masks look like a trained model's),
the palm one recorded with `--upscaler` (random weights of the official architecture).

    .venv/bin/python benchmarks/infer.py                                  # CPU, 2048², compact x4
    .venv/bin/python benchmarks/infer.py --device cuda --fp16 --images 16 --upscaler RealESRGAN_x4plus
    .venv/bin/python benchmarks/infer.py --set model.input_size=512       # lighter networks
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
OLD_REF = "398afff"  # the chain before issue 28's rework (upscaled crops through host memory)
TARGET_IMAGES_PER_S = {"RealESRGAN_x4plus": 10, "realesr-general-x4v3": 20}
"""Floor of the fused chain on one H200-class GPU at 2048², by upscaler (the compact one for any other)."""


# --------------------------------------------------------------------------- worker (subprocess)

class ForwardClock:
    """Wall time inside outermost `nn.Module` calls (the networks), by global forward hooks."""

    def __init__(self, device: str):
        import torch
        from torch.nn.modules import module

        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.depth, self.t0, self.seconds, self.calls = 0, 0.0, 0.0, 0
        self._hooks = [module.register_module_forward_pre_hook(self._pre),
                       module.register_module_forward_hook(self._post)]

    def _pre(self, mod, args) -> None:
        if self.depth == 0:
            self.sync()
            self.t0 = time.perf_counter()
        self.depth += 1

    def _post(self, mod, args, out) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.sync()
            self.seconds += time.perf_counter() - self.t0
            self.calls += 1

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def worker(a: argparse.Namespace) -> dict:
    """One chain (old or new, whichever `twostage` is on the path): build, warm up on the first
    image, then time all images, with and (on CUDA) without the forward hooks."""
    import torch

    import twostage
    from twostage.inference.chain import TwoStage
    from twostage.inference.infer import find_images, run

    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    samples = find_images(a.images)
    options = dict(device=a.device, fp16=a.fp16, upscaler_tile=a.tile, weights_dir=a.weights_dir,
                   calibration="none", **json.loads(a.options))
    t0 = time.perf_counter()
    chain = TwoStage.build(a.global_ckpt, a.palm_ckpt, **options)
    sync()
    build = time.perf_counter() - t0
    out = Path(a.out)

    def timed(items, csv: Path, hooks: bool) -> tuple[float, float, dict]:
        clock = ForwardClock(a.device) if hooks else None
        t = time.perf_counter()
        summary = run(chain, items, csv, fuse=True, batch_size=a.batch_size)
        sync()
        wall = time.perf_counter() - t
        if clock is not None:
            clock.remove()
        return wall, clock.seconds if clock else float("nan"), summary.timings

    first, _, _ = timed(samples[:1], out / "warm.csv", hooks=False)
    wall, net, steps = timed(samples, out / "out.csv", hooks=True)
    plain = timed(samples, out / "plain.csv", hooks=False)[0] if cuda else wall
    n = len(samples)
    return {"package": str(Path(twostage.__file__).parent), "images": n, "build_s": build,
            "setup_s": build + max(0.0, first - plain / n), "first_image_s": first,
            "per_image_s": plain / n, "hooked_per_image_s": wall / n, "network_per_image_s": net / n,
            "rest_per_image_s": (wall - net) / n, "steps_per_image_s": {k: v / n for k, v in steps.items()},
            "images_per_s": n / plain,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


# --------------------------------------------------------------------------- driver

def unpack_old(ref: str, into: Path) -> Path:
    """The `twostage` package of git revision `ref`, unpacked under `into` (a PYTHONPATH root)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "twostage"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"benchmarks/infer.py: git archive {ref}: {archive.stderr.decode().strip()} "
                         "(the old chain needs this git checkout; give --old REF)")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def run_worker(pythonpath: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, __file__, "--worker", *args, "--out", str(out)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"worker ({pythonpath}) failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--fp16", action="store_true", help="--fp16 for both chains (CUDA)")
    p.add_argument("--size", type=int, default=2048, help="phantom side (default 2048)")
    p.add_argument("--images", type=int, default=3, help="phantoms inferred (default 3)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--upscaler", default="realesr-general-x4v3",
                   help="palm upscaler (default the compact x4; RealESRGAN_x4plus is RRDBNet x4, slow on a CPU)")
    p.add_argument("--box-side", default="0.1,0.15", help="palm box side range, fractions of the image side")
    p.add_argument("--tile", type=int, default=0, help="upscaler tile (default 0: the whole crop)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stage config override")
    p.add_argument("--new-options", default="{}", help="JSON: extra ChainOptions for the new chain only "
                   "(e.g. '{\"compile\": true}')")
    p.add_argument("--old", default=OLD_REF, help=f"git revision of the old chain (default {OLD_REF})")
    p.add_argument("--rounds", type=int, default=1, help="old/new rounds, alternating (best per chain)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for k in ("images-dir", "global-ckpt", "palm-ckpt", "weights-dir", "out", "options"):
        p.add_argument(f"--{k}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.images = a.images_dir
        print(json.dumps(worker(a)))
        return 0

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from device_compare import confident_models
    from rehearsal_2048 import make_rrdb_weights

    from twostage.data.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="bench-infer-") as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        data = synthesize(tmp / "data", n=1, test_n=a.images, size=a.size, seed=0)
        images = data / "test" / "DCM"
        wdir = tmp / "weights"
        wdir.mkdir()
        if a.upscaler != "bicubic":
            make_rrdb_weights(wdir, (a.upscaler,))
        side = tuple(float(v) for v in a.box_side.split(","))
        models = confident_models(images, tmp / "models", a.device, a.set, wdir, a.tile, upscaler=a.upscaler,
                                  box_side=side)
        old_root = unpack_old(a.old, tmp / "old")
        print(f"{a.images} phantoms of {a.size}², models and old chain ({a.old}) ready in "
              f"{time.perf_counter() - t0:.0f} s; device {a.device}{' fp16' if a.fp16 else ''}, "
              f"upscaler {a.upscaler}, batch {a.batch_size}", flush=True)
        common = ["--device", a.device, "--batch-size", str(a.batch_size), "--tile", str(a.tile),
                  "--images-dir", str(images), "--global-ckpt", models["global"], "--palm-ckpt", models["palm"],
                  "--weights-dir", str(wdir), *(["--fp16"] if a.fp16 else [])]
        best: dict[str, dict] = {}
        for r in range(a.rounds):
            for label, path, opts in (("old", old_root, "{}"), ("new", ROOT, a.new_options)):
                res = run_worker(path, [*common, "--options", opts], tmp / f"{label}{r}")
                res["csv"] = str(tmp / f"{label}{r}" / "out.csv")
                print(f"  round {r + 1} {label}: {res['per_image_s']:.3f} s/image "
                      f"(network {res['network_per_image_s']:.3f}), set-up {res['setup_s']:.2f} s", flush=True)
                if label not in best or res["per_image_s"] < best[label]["per_image_s"]:
                    best[label] = res
        old, new = best["old"], best["new"]
        same = Path(old["csv"]).read_bytes() == Path(new["csv"]).read_bytes()

        def share(x: dict) -> float:
            return x["rest_per_image_s"] / x["hooked_per_image_s"]

        for x in (old, new):
            x["rest_share"] = share(x)
        target = TARGET_IMAGES_PER_S.get(a.upscaler, TARGET_IMAGES_PER_S["realesr-general-x4v3"])

        rows = [("set-up (build + first-call warm-up), s", "setup_s", "{:.2f}"),
                ("  of which building the chain, s", "build_s", "{:.2f}"),
                ("per image, s", "per_image_s", "{:.3f}"),
                ("  network forwards, s", "network_per_image_s", "{:.3f}"),
                ("  everything else, s", "rest_per_image_s", "{:.3f}"),
                ("images per second", "images_per_s", "{:.2f}")]
        print(f"\n{'':<42}{'old':>10}{'new':>10}{'new/old':>10}")
        for title, key, fmt in rows:
            print(f"{title:<42}{fmt.format(old[key]):>10}{fmt.format(new[key]):>10}{new[key] / old[key]:>10.2f}")
        print(f"{'share outside the networks':<42}{share(old):>10.1%}{share(new):>10.1%}")
        if a.device.startswith("cuda"):
            print(f"{'peak GPU memory, GiB':<42}{old['peak_gpu_gib']:>10.2f}{new['peak_gpu_gib']:>10.2f}")
        print(f"\nsteps per image (InferSummary.timings), s:\n  {'step':<12}{'old':>9}{'new':>9}")
        for k in new["steps_per_image_s"]:
            print(f"  {k:<12}{old['steps_per_image_s'].get(k, 0):>9.4f}{new['steps_per_image_s'][k]:>9.4f}")
        print(f"\nCSVs byte-identical: {same}")
        if a.device.startswith("cuda"):
            print(f"fused images per second: {new['images_per_s']:.1f} (floor {target} with {a.upscaler})")
        if a.json:
            a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "old": old, "new": new,
                                          "csv_identical": same, "target_images_per_s": target}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
