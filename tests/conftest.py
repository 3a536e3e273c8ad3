"""Shared fixtures. Helpers: append your fixtures below, do not edit others'."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.data.annotations import Annotation, write_annotations
from twostage.io.files import write_png_atomic

# Tests never touch the network: model hubs answer offline at once (set before anything
# imports huggingface_hub, which reads it at import); subprocesses inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Training-input caches of the tests go to a throwaway folder, never the user's ~/.cache.
os.environ.setdefault("TWOSTAGE_CACHE", tempfile.mkdtemp(prefix="twostage-test-cache-"))


# --- CLI helper: `python -m twostage ...` as a user runs it, and its one-line errors ---------

REPO = Path(__file__).resolve().parent.parent

CLI_ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
"""Environment of a CLI subprocess: this checkout first on the path, no update nags or warnings."""


def twostage_cmd(*args) -> list[str]:
    """The argv of `python -m twostage ARGS` (for Popen and friends)."""
    return [sys.executable, "-m", "twostage", *map(str, args)]


def run_cli(*args, cwd: Path | None = None, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run `python -m twostage ARGS` in a subprocess with CLI_ENV (plus `env`); text output captured."""
    return subprocess.run(twostage_cmd(*args), capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**CLI_ENV, **(env or {})})


def assert_one_line_error(res: subprocess.CompletedProcess | str, *fragments: str, rc: int | None = None) -> str:
    """A user mistake as the CLI reports it: (for a process) a non-zero exit, `rc` if given; no
    traceback; exactly one `error:` line, the last one, holding every fragment (case-insensitive).
    `res` is a finished process or its stderr text. Returns the line."""
    stderr = res if isinstance(res, str) else res.stderr
    if not isinstance(res, str):
        assert res.returncode != 0, f"exit 0 on bad input; stderr:\n{stderr}"
        if rc is not None:
            assert res.returncode == rc, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]  # tqdm bars aside
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr  # one line, nothing after it
    for f in fragments:
        assert f.lower() in errors[0].lower(), f"{f!r} not in {errors[0]!r}"
    return errors[0]


# --- data helper: tiny datasets written to disk ------------------------------------------------

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


@pytest.fixture(scope="session")
def make_phantoms(tmp_path_factory) -> Callable[..., Path]:
    """make_phantoms(name, n=4, size=128, seed=0, folder="DATA", **synthesize_kwargs): a fresh
    phantom dataset (`twostage synth`) at <tmp>/<name>N/<folder>; returns its root. Each call
    writes its own folder, so a test may change what it gets."""
    from twostage.data.synth import synthesize

    def _make(name: str, n: int = 4, size: int = 128, seed: int = 0, folder: str = "DATA", **kwargs) -> Path:
        return synthesize(tmp_path_factory.mktemp(name) / folder, n=n, size=size, seed=seed, **kwargs)

    return _make


def bicubic_palm_set(data: Path, scale: int = 2) -> Path:
    """The palm set of `data` (prepare-sr with bicubic x`scale`) at <data>/../PALM: the palm
    training data of tests that need one but do not test prepare-sr itself."""
    from twostage.sr.prepare import prepare_sr

    out = data.parent / "PALM"
    prepare_sr(data, out, upscaler="bicubic", scale=scale)
    return out


@pytest.fixture(scope="session")
def make_world(tmp_path_factory, make_phantoms, make_tiny_checkpoint) -> Callable[..., dict]:
    """make_world(name, n=4, size=128, seed=0, palm=True): phantoms and random-init checkpoints
    in one folder: {"root", "data", "global"[, "palm"]} (paths) for the tests of a command's
    failure modes."""

    def _make(name: str, n: int = 4, size: int = 128, seed: int = 0, palm: bool = True) -> dict:
        data = make_phantoms(name, n=n, size=size, seed=seed)
        root = data.parent
        world = {"root": root, "data": data, "global": make_tiny_checkpoint(root / "global.pt", "global")}
        if palm:
            world["palm"] = make_tiny_checkpoint(root / "palm.pt", "palm", classes=PALM_CLASSES)
        return world

    return _make


# --- sr helper: tiny random-init Real-ESRGAN weights + manifest ------------------------------

SR_TEST_ENTRIES = {
    # Same architecture classes as the official entries, tiny sizes so CPU tests are fast.
    "rrdb-x4": ("RRDBNet", 4, {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 1,
                                "num_grow_ch": 4, "scale": 4}),
    "rrdb-x2": ("RRDBNet", 2, {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 1,
                                "num_grow_ch": 4, "scale": 2}),
    "vgg-x4": ("SRVGGNetCompact", 4, {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_conv": 2,
                                      "upscale": 4, "act_type": "prelu"}),
}


def write_sr_weights(directory: Path, url_base: str = "https://example.invalid/") -> Path:
    """Random-init networks of SR_TEST_ENTRIES saved as the official files are saved
    ({"params_ema": state_dict}) plus a manifest pinning their sha256; returns the manifest."""
    import torch
    import yaml

    from twostage.io.files import sha256_file
    from twostage.sr.compat import import_basicsr

    RRDBNet, SRVGGNetCompact = import_basicsr()
    classes = {"RRDBNet": RRDBNet, "SRVGGNetCompact": SRVGGNetCompact}
    torch.manual_seed(0)
    entries = {}
    for name, (arch, scale, params) in SR_TEST_ENTRIES.items():
        path = Path(directory) / f"{name}.pth"
        torch.save({"params_ema": classes[arch](**params).state_dict()}, path)
        entries[name] = {"file": path.name, "arch": arch, "scale": scale, "url": url_base + path.name,
                         "sha256": sha256_file(path), "params": params}
    manifest = Path(directory) / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"weights": entries}))
    return manifest


@pytest.fixture(scope="session")
def make_sr_weights() -> Callable[..., Path]:
    """make_sr_weights(directory, url_base=...): `write_sr_weights` (usable from any fixture scope)."""
    return write_sr_weights


# --- ensemble helper: tiny random-init checkpoints for visualize / calibrate -------------------

@pytest.fixture(scope="session")
def make_tiny_checkpoint() -> Callable[..., Path]:
    """make_tiny_checkpoint(path, stage, classes=CLASSES, seed=0, input_size=64, train_ids=None, window=None): a random-init
    tiny smp network saved as a real twostage checkpoint (palm: bicubic x4 palm set, box rule)."""
    import torch

    from twostage.box import BoxRule
    from twostage.checkpoint import save_checkpoint
    from twostage.models import build_model
    from twostage.pretrained import default_normalization
    from twostage.sr.upscale import make_upscaler

    model = {"arch": "Unet", "encoder": "tu-mobilenetv3_small_050", "in_channels": 3,
             "kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}

    def _make(path: Path, stage: str, classes=CLASSES, seed: int = 0, input_size: int = 64,
              train_ids=None, window: dict | None = None) -> Path:
        torch.manual_seed(seed)
        net = build_model(model["arch"], model["encoder"], len(classes), model["in_channels"], **model["kwargs"])
        meta = {"stage": stage, "classes": list(classes), "model": model, "input_size": input_size,
                "normalization": default_normalization(None)}
        if train_ids is not None:
            meta["train_ids"] = sorted(train_ids)
        if window is not None:  # a patch-trained checkpoint: {size: [P, P], scale: s}
            meta["window"] = window
        if stage == "palm":
            rule = BoxRule(margin=0.15, side_min=0.1, side_max=0.6, fallback=(0.5, 0.6, 0.3))
            meta.update(box_rule=rule.to_dict(), palm_set={**make_upscaler("bicubic", 4).record(), "context": 1.5})
        return save_checkpoint(path, net.state_dict(), meta)

    return _make


# --- a local HTTP server: `twostage weights --fetch` without the network ---------------------

@pytest.fixture
def http_dir(tmp_path: Path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/srv; yields (folder, base URL)."""
    import functools
    import http.server
    import threading

    srv = tmp_path / "srv"
    srv.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(srv))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


# --- fuzz helper: hypothesis profiles (tests/test_fuzz.py) ----------------------------------

def _register_hypothesis_profiles() -> None:
    """`ci` (the default): each fuzz test's fixed budget, derandomized (the same examples on every
    run: a fixed seed), no example database. `long`: 100× the examples, random seeds, for a
    local search (`pytest tests/test_fuzz.py --hypothesis-profile=long`)."""
    from hypothesis import HealthCheck, settings

    common = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
    settings.register_profile("ci", max_examples=100, derandomize=True, database=None, **common)
    settings.register_profile("long", max_examples=10_000, **common)
    settings.load_profile("ci")


_register_hypothesis_profiles()
