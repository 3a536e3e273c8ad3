"""`twostage export` and `infer --exported DIR --backend onnxruntime`: each ONNX network against
PyTorch, the exported chain's CSV against the PyTorch chain's, and every refusal in one line.

Tiny random-initialised checkpoints (tests/conftest.py) and a tiny compact SRVGG / RRDB
upscaler; phantoms at 256². The stage architectures of stages/*.yaml and a trained demo pair
are the slow tests at the end.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from twostage.checkpoint import load_checkpoint, save_checkpoint
from twostage.classes import CLASSES, PALM_CLASSES
from twostage.cli import main
from twostage.data.synth import synthesize
from twostage.errors import TwostageError
from twostage.inference.chain import TwoStage
from twostage.inference.export import TOLERANCE, export
from twostage.inference.onnx_backend import CHAIN_FILE, OnnxNet, read_exported
from twostage.io.images import read_image
from twostage.rle import decode, read_csv
from twostage.sr.upscale import make_upscaler

CPU = torch.device("cpu")


def _with_upscaler(ckpt: Path, name: str, weights: Path) -> Path:
    """The palm checkpoint `ckpt`, rewritten as if its crops had been made by upscaler `name`."""
    obj = load_checkpoint(ckpt)
    meta = {**obj["meta"], "palm_set": {**make_upscaler(name, weights_dir=weights).record(), "context": 1.5}}
    return save_checkpoint(ckpt, obj["state_dict"], meta)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_checkpoint) -> dict:
    from conftest import write_sr_weights

    base = tmp_path_factory.mktemp("export")
    root = synthesize(base / "DATA", n=2, size=256, seed=3)
    weights = base / "weights"
    weights.mkdir()
    write_sr_weights(weights)
    g = make_tiny_checkpoint(base / "g.pt", "global")
    p = _with_upscaler(make_tiny_checkpoint(base / "p.pt", "palm", classes=PALM_CLASSES, seed=1), "vgg-x4", weights)
    out = base / "exported"
    export(g, out, palm_ckpt=p, weights_dir=weights)
    return {"root": root, "global": g, "palm": p, "weights": weights, "out": out, "base": base}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def _largest_differences(folder: Path, chain: TwoStage, images: list[np.ndarray]) -> dict[str, float]:
    """Per network: the largest |p_onnx − p_torch| over real inputs at the chain's size, a batch
    of two, and another size (probabilities; the upscaler's output in [0, 1])."""
    out = {}
    x = torch.from_numpy(np.stack(images))
    for name, predictor in (("global", chain.glob), ("palm", chain.palm.predictor)):
        net = OnnxNet(folder / f"{name}.onnx", CPU)
        worst = 0.0
        for inp in (predictor.preprocess(x[:1]), predictor.preprocess(x), predictor.preprocess(x[:1], (80, 104))):
            with torch.no_grad():
                want = torch.sigmoid(predictor.model(inp))
            worst = max(worst, float((torch.sigmoid(net(inp)) - want).abs().max()))
        out[name] = worst
    crop = torch.from_numpy(images[0][40:88, 60:100].astype(np.float32) / 255)[None, None].expand(1, 3, -1, -1)
    with torch.no_grad():
        want = chain.palm.upscaler.network(crop)
    out["upscaler"] = float((OnnxNet(folder / "upscaler.onnx", CPU)(crop) - want).abs().max())
    return out


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_each_network_agrees_with_pytorch(setup, tmp_path, fp16, record_property):
    folder = setup["out"]
    if fp16:
        folder = tmp_path / "fp16"
        export(setup["global"], folder, palm_ckpt=setup["palm"], weights_dir=setup["weights"], fp16=True)
    chain = TwoStage.build(setup["global"], setup["palm"], weights_dir=setup["weights"])
    images = [read_image(p) for p in sorted((setup["root"] / "train" / "DCM").rglob("*.png"))[:2]]
    diffs = _largest_differences(folder, chain, images)
    for name, d in diffs.items():
        record_property(f"{name}_{'fp16' if fp16 else 'fp32'}", d)
    print("largest probability differences", "fp16" if fp16 else "fp32", diffs)
    assert max(diffs.values()) <= (TOLERANCE["fp16"] if fp16 else 1e-4), diffs
    spec = read_exported(folder)
    assert spec["precision"] == ("fp16" if fp16 else "fp32")
    for name in ("global", "palm"):
        assert spec[name]["export"]["dynamic"] == {"batch": True, "height": True, "width": True}
    assert spec["upscaler"]["upscaler"] == "vgg-x4" and spec["upscaler"]["file"] == "upscaler.onnx"


def _class_dice(a: Path, b: Path, shape: tuple[int, int]) -> dict[str, float]:
    """Per class: Dice of the two CSVs' masks, pooled over images (1 where both are empty)."""
    ra, rb = read_csv(a), read_csv(b)
    assert sorted(ra) == sorted(rb)
    dice = {}
    for c in CLASSES:
        inter = total = 0
        for name in ra:
            ma, mb = decode(ra[name][c], shape), decode(rb[name][c], shape)
            inter += int((ma & mb).sum())
            total += int(ma.sum() + mb.sum())
        dice[c] = 1.0 if total == 0 else 2 * inter / total
    return dice


def test_exported_chain_writes_the_pytorch_chains_csv(setup, tmp_path, capsys):
    root, pt, ort = setup["root"], tmp_path / "pt.csv", tmp_path / "ort.csv"
    assert main(["infer", str(root), "--split", "train", "--global", str(setup["global"]), "--palm",
                 str(setup["palm"]), "--fuse", "--weights-dir", str(setup["weights"]), "--out", str(pt)]) == 0
    assert main(["infer", str(root), "--split", "train", "--exported", str(setup["out"]), "--backend", "onnxruntime",
                 "--out", str(ort)]) == 0
    assert "global + palm (fused)" in capsys.readouterr().out
    dice = _class_dice(pt, ort, (256, 256))
    print("per-class Dice, exported vs PyTorch: min", min(dice.values()))
    assert min(dice.values()) >= 0.999, dice
    # a runtime option applies (tiling the upscaler gives the same crops); a result option is refused
    tiled = tmp_path / "tiled.csv"
    assert main(["infer", str(root), "--split", "train", "--exported", str(setup["out"]), "--tile", "16",
                 "--out", str(tiled)]) == 0
    assert min(_class_dice(pt, tiled, (256, 256)).values()) >= 0.999
    assert main(["infer", str(root), "--exported", str(setup["out"]), "--thresholds", "0.3",
                 "--out", str(tmp_path / "x.csv")]) == 2
    assert "--thresholds: fixed in" in _one_line(capsys)


def test_global_only_export(setup, tmp_path):
    out = tmp_path / "g-only"
    summary = export(setup["global"], out)
    assert set(summary.files) == {"global.onnx"}
    spec = read_exported(out)
    assert "palm" not in spec and "upscaler" not in spec and spec["thresholds"]["Ulna"] == 0.5
    pt, ort = tmp_path / "pt.csv", tmp_path / "ort.csv"
    assert main(["infer", str(setup["root"]), "--split", "train", "--global", str(setup["global"]),
                 "--out", str(pt)]) == 0
    assert main(["infer", str(setup["root"]), "--split", "train", "--exported", str(out), "--out", str(ort)]) == 0
    assert min(_class_dice(pt, ort, (256, 256)).values()) >= 0.999


def test_recorded_windows_and_tta_run_as_in_pytorch(setup, tmp_path, make_tiny_checkpoint):
    """A patch-trained global model (sliding windows), exported with --tta hflip and --overlap:
    chain.yaml carries them and the exported chain's CSV is the PyTorch chain's with those flags
    (--scales: recorded likewise; other input sizes are the network test's)."""
    g = make_tiny_checkpoint(tmp_path / "w.pt", "global", window={"size": [64, 64], "scale": 0.5})
    flags = ["--tta", "hflip", "--overlap", "0.25"]
    assert main(["export", "--global", str(g), "--out", str(tmp_path / "w"), *flags]) == 0
    spec = read_exported(tmp_path / "w")
    assert spec["global"]["window"] == {"size": [64, 64], "scale": 0.5}
    assert spec["inference"]["tta"] == "hflip" and spec["inference"]["overlap"] == 0.25
    pt, ort = tmp_path / "pt.csv", tmp_path / "ort.csv"
    for args, csv in ((["--global", str(g), *flags], pt), (["--exported", str(tmp_path / "w")], ort)):
        assert main(["infer", str(setup["root"]), "--split", "train", *args, "--out", str(csv)]) == 0
    assert min(_class_dice(pt, ort, (256, 256)).values()) >= 0.999


@pytest.mark.parametrize("name", ["rrdb-x4", "rrdb-x2"])
def test_real_esrgan_rrdb_networks_export_with_dynamic_sizes(setup, tmp_path, name):
    """RRDBNet (RealESRGAN_x4plus / x2plus; x2 unshuffles pixels first), as the chain exports it."""
    from twostage.inference.export import export_upscaler

    record = export_upscaler(make_upscaler(name, weights_dir=setup["weights"]).network, tmp_path / "u.onnx")
    assert record["dynamic"]["height"] and record["max_difference"] <= 1e-4


def test_a_network_without_dynamic_sizes_is_fixed_and_says_why(setup, tmp_path, monkeypatch, capsys):
    import twostage.inference.export as ex

    real = ex._write_onnx

    def no_dynamic(module, example, path, method, dynamic, opset):
        if dynamic:
            raise RuntimeError("Unsupported: ONNX export of operator adaptive_avg_pool2d, input size not accessible. "
                               "Please feel free to request support")
        return real(module, example, path, method, dynamic, opset)

    monkeypatch.setattr(ex, "_write_onnx", no_dynamic)
    out = tmp_path / "fixed"
    export(setup["global"], out)
    record = read_exported(out)["global"]["export"]
    assert record["dynamic"] == {"batch": True, "height": False, "width": False} and record["fixed_size"] == [64, 64]
    assert "adaptive_avg_pool2d" in record["why_fixed"] and "Please" not in record["why_fixed"]
    pt, ort = tmp_path / "pt.csv", tmp_path / "ort.csv"
    for args, csv in ((["--global", str(setup["global"])], pt), (["--exported", str(out)], ort)):
        assert main(["infer", str(setup["root"]), "--split", "train", *args, "--out", str(csv)]) == 0
    assert min(_class_dice(pt, ort, (256, 256)).values()) >= 0.999
    with pytest.raises(TwostageError, match="exported for 64x64 inputs only"):
        OnnxNet(out / "global.onnx", CPU, (64, 64), "why")(torch.zeros(1, 3, 32, 32))
    # multi-scale TTA needs other sizes: refused at export, in one line, nothing written
    assert main(["export", "--global", str(setup["global"]), "--out", str(tmp_path / "ms"), "--scales", "0.75,1"]) == 2
    assert "needs other input sizes" in _one_line(capsys) and not (tmp_path / "ms").exists()


# --- refusals: one line, never a half-written folder --------------------------------------------

def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_unexportable_checkpoints_are_one_line_and_write_nothing(setup, tmp_path, capsys, monkeypatch):
    obj = load_checkpoint(setup["global"])
    unknown = save_checkpoint(tmp_path / "unknown.pt", obj["state_dict"],
                              {**obj["meta"], "model": {**obj["meta"]["model"], "arch": "NoSuchNet"}})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for ckpt, says in ((unknown, "NoSuchNet"), (junk, "not a safe twostage checkpoint")):
        assert main(["export", "--global", str(ckpt), "--out", str(tmp_path / "o")]) == 2
        assert says in _one_line(capsys)
    # an operator ONNX lacks, in every exporter: the reason, one line, no folder, no temporary one
    import twostage.inference.export as ex

    def unsupported(*a, **k):
        raise RuntimeError("Unsupported: ONNX export of operator frobnicate. Please feel free to request support")

    monkeypatch.setattr(ex, "_write_onnx", unsupported)
    assert main(["export", "--global", str(setup["global"]), "--out", str(tmp_path / "o")]) == 2
    err = _one_line(capsys)
    assert "global: cannot be exported to ONNX" in err and "operator frobnicate" in err
    assert not (tmp_path / "o").exists()
    _no_leftovers(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", "--global", str(setup["global"]), "--out", str(tmp_path / "full")]) == 2
    assert "folder is not empty" in _one_line(capsys)


def _run(folder: Path, root: Path, out: Path) -> int:
    return main(["infer", str(root), "--split", "train", "--exported", str(folder), "--backend", "onnxruntime",
                 "--out", str(out)])


def test_damaged_or_changed_folders_are_refused_in_one_line(setup, tmp_path, capsys):
    root, csv = setup["root"], tmp_path / "x.csv"

    def copy(name: str) -> Path:
        return Path(shutil.copytree(setup["out"], tmp_path / name))

    changed = copy("changed")
    data = bytearray((changed / "palm.onnx").read_bytes())
    data[len(data) // 2] ^= 1  # one bit of one weight
    (changed / "palm.onnx").write_bytes(bytes(data))
    missing = copy("missing")
    (missing / "upscaler.onnx").unlink()
    no_yaml = copy("no-yaml")
    (no_yaml / CHAIN_FILE).unlink()
    garbage = copy("garbage")
    (garbage / CHAIN_FILE).write_text("format: [unclosed\n")
    wrong = copy("wrong")
    text = (wrong / CHAIN_FILE).read_text().replace("feather: 0.1", "feather: lots")
    (wrong / CHAIN_FILE).write_text(text)
    cases = {changed: "differs from", missing: "upscaler.onnx: missing", no_yaml: "not an exported chain",
             garbage: CHAIN_FILE, wrong: "feather", tmp_path / "absent": "no such folder"}
    for folder, says in cases.items():
        assert _run(folder, root, csv) == 2, folder
        assert says in _one_line(capsys), folder
        assert not csv.exists()
    for args, says in ((["--global", str(setup["global"]), "--backend", "onnxruntime"], "give --exported"),
                       (["--exported", str(setup["out"]), "--palm", str(setup["palm"])], "whole chain")):
        assert main(["infer", str(root), *args, "--out", str(csv)]) == 2
        assert says in _one_line(capsys)


# --- slow: the stage architectures and a trained demo pair --------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("stage", ["global", "palm"])
def test_stage_architectures_export(stage, tmp_path):
    """stages/global.yaml (UPerNet + HRNet-W32) and stages/palm.yaml (UNet++ + EfficientNet-B3),
    random weights at 128²: UNet++ keeps dynamic sizes; UPerNet's adaptive pooling cannot follow
    another size in ONNX, so it is fixed at its input size (through torch.export; onnxscript)."""
    import importlib.util

    from twostage.config import load_config
    from twostage.inference.export import export_network
    from twostage.models import build_model

    cfg = load_config(stage)
    net = build_model(cfg.model.arch, cfg.model.encoder, len(cfg.classes), cfg.model.in_channels).eval()
    path = tmp_path / f"{stage}.onnx"
    kw = dict(fp16=False, opset=17, allow_fixed=True, fixed_reason="")
    if stage == "global" and importlib.util.find_spec("onnxscript") is None:
        with pytest.raises(TwostageError, match="adaptive_avg_pool2d"):
            export_network(net, stage, (2, 3, 128, 128), path, **kw)
        return
    record = export_network(net, stage, (2, 3, 128, 128), path, **kw)
    print(stage, cfg.model.arch, cfg.model.encoder, record)
    assert record["max_difference"] <= 1e-4
    assert record["dynamic"]["height"] is (stage == "palm")


@pytest.mark.slow
def test_trained_demo_pair_exported_csv_agrees(tmp_path):
    """`twostage demo --quick` (trained global and palm, the demo's trained upscaler, calibration):
    the exported chain's CSV of the held-out images against the PyTorch chain's."""
    from twostage.demo import run_demo

    demo = tmp_path / "demo"
    run_demo(demo, quick=True)
    g, p, w = demo / "runs" / "global", demo / "runs" / "palm", demo / "weights"
    assert main(["export", "--global", str(g), "--palm", str(p), "--weights-dir", str(w), "--out",
                 str(tmp_path / "exported")]) == 0
    assert read_exported(tmp_path / "exported")["fusion"]["calibration"]
    pt, ort = tmp_path / "pt.csv", tmp_path / "ort.csv"
    images = demo / "heldout"
    assert main(["infer", str(images), "--global", str(g), "--palm", str(p), "--fuse", "--weights-dir", str(w),
                 "--out", str(pt)]) == 0
    assert _run(tmp_path / "exported", images, ort) == 0
    shape = read_image(next((images / "train" / "DCM").rglob("*.png"))).shape
    dice = _class_dice(pt, ort, shape)
    print("trained demo pair, per-class Dice exported vs PyTorch: min", min(dice.values()))
    assert min(dice.values()) >= 0.999, dice
