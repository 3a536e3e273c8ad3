"""`twostage train-sr`: Real-ESRGAN degradations, the training loop, the written file and its use."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, twostage_cmd

from twostage.cli import main
from twostage.data.synth import synthesize
from twostage.errors import TwostageError
from twostage.io.files import sha256_file
from twostage.sr import weights as W
from twostage.sr.degrade import DegradationConfig, Degrader
from twostage.sr.patches import sample_patches, to_tensor
from twostage.sr.train_config import load_sr_config
from twostage.sr.training import train_sr
from twostage.sr.upscale import make_upscaler

TINY = ["net.num_feat=4", "net.num_conv=1", "data.gt_size=96", "train.batch_size=2", "train.steps=4",
        "train.val_every=2", "train.save_every=1", "data.holdout=1", "data.val_size=96", "train.device=cpu"]
"""A network and a run small enough for a few seconds on a CPU."""


@pytest.fixture(scope="module")
def phantoms(make_phantoms) -> Path:
    """6 phantom radiographs of 256² (3 IDs x L/R hands) with carpal polygons."""
    return make_phantoms("sr", n=6, size=256, seed=3, folder="data")


def _cfg(data: Path, run: Path, *extra: str):
    return load_sr_config("demo-sr", overrides=[f"data.root={data}", f"train.out={run}", *TINY, *extra])


# --------------------------------------------------------------------------- degradation

def test_degrader_makes_grey_8bit_low_resolution_patches():
    torch.manual_seed(0)
    gt = torch.rand(3, 1, 96, 128).expand(-1, 3, -1, -1).contiguous()
    from twostage.train.run import seed_everything

    seed_everything(5)
    lq = Degrader(DegradationConfig(), 4)(gt)
    assert lq.shape == (3, 3, 24, 32) and 0 <= lq.min() and lq.max() <= 1
    assert torch.equal(lq[:, 0], lq[:, 1]) and torch.equal(lq[:, 1], lq[:, 2])  # grey noise keeps it grey
    assert torch.allclose(lq * 255, (lq * 255).round(), atol=1e-4)  # 8-bit levels, as Real-ESRGAN rounds
    seed_everything(5)
    assert torch.equal(Degrader(DegradationConfig(), 4)(gt), lq)  # the seeded generators decide everything
    assert not torch.equal(lq[0], lq[1])  # every patch its own degradation


def test_degradation_config_errors():
    with pytest.raises(TwostageError, match="at least 96|>= 96"):
        Degrader(DegradationConfig(), 4)(torch.zeros(1, 3, 64, 64))
    with pytest.raises(TwostageError, match="kernel_list"):
        Degrader(DegradationConfig(kernel_list=["iso", "nope"], kernel_prob=[0.5, 0.5]), 4)
    with pytest.raises(TwostageError, match="jpeg_range"):
        Degrader(DegradationConfig(jpeg_range=[95.0, 30.0]), 4)


def test_patches_come_from_the_regions_and_pad_small_ones():
    np.random.seed(0)
    small = np.arange(50 * 60, dtype=np.uint8).reshape(50, 60)
    p = sample_patches([small], 4, 96)
    assert p.shape == (4, 96, 96) and p.dtype == np.uint8
    x = to_tensor(p, "cpu")
    assert x.shape == (4, 3, 96, 96) and torch.equal(x[:, 0], x[:, 2]) and float(x.max()) <= 1


# --------------------------------------------------------------------------- the written file

def test_trained_file_loads_like_an_official_one(phantoms, tmp_path, make_sr_weights):
    wd = tmp_path / "weights"
    result = train_sr("xray-tiny", _cfg(phantoms, tmp_path / "run"), weights_dir=wd)
    assert result.finished and result.path == wd / "xray-tiny.pth"
    saved = torch.load(result.path, weights_only=True)
    assert list(saved) == ["params_ema"] and all(isinstance(v, torch.Tensor) for v in saved["params_ema"].values())
    entry = yaml.safe_load((wd / W.TRAINED_NAME).read_text())["weights"]["xray-tiny"]
    assert entry["sha256"] == sha256_file(result.path) == result.sha256
    assert entry["arch"] == "SRVGGNetCompact" and entry["scale"] == 4 and entry["url"] is None
    assert entry["trained_on"]["data"] == str(phantoms.resolve()) and entry["trained_on"]["steps"] == 4
    assert set(entry["trained_on"]["quality"]) == {"clean", "degraded"}
    # through the same manifest / sha256 / RealESRGANer path as the official files
    up = make_upscaler("xray-tiny", weights_dir=wd)
    assert up.record() == {"upscaler": "xray-tiny", "scale": 4, "weight_sha256": result.sha256}
    crop = np.random.default_rng(0).integers(0, 255, (40, 30), dtype=np.uint8)
    assert up(crop).shape == (160, 120)
    rows = {r["name"]: r for r in W.status(wd)}
    assert rows["xray-tiny"]["state"] == "ok" and "RealESRGAN_x4plus" in rows  # listed with the official ones
    # a damaged file is refused like an official one
    data = bytearray(result.path.read_bytes())
    data[-10] ^= 0xFF
    result.path.write_bytes(bytes(data))
    with pytest.raises(TwostageError, match="does not match"):
        make_upscaler("xray-tiny", weights_dir=wd)
    with pytest.raises(TwostageError, match="trained by `twostage train-sr`"):
        W.fetch("xray-tiny", wd)


def test_prepare_sr_and_the_palm_record_use_the_trained_name(phantoms, tmp_path):
    wd = tmp_path / "weights"
    train_sr("xray-tiny", _cfg(phantoms, tmp_path / "run"), weights_dir=wd)
    out = tmp_path / "palm"
    assert main(["prepare-sr", str(phantoms), "--out", str(out), "--upscaler", "xray-tiny",
                 "--weights-dir", str(wd)]) == 0
    record = json.loads((out / "palmset.json").read_text())
    assert record["upscaler"] == "xray-tiny" and record["weight_sha256"] == sha256_file(wd / "xray-tiny.pth")


def test_resumed_run_reaches_the_same_weights(phantoms, tmp_path):
    once = train_sr("a", _cfg(phantoms, tmp_path / "once"), weights_dir=tmp_path / "w1")
    stopped = train_sr("b", _cfg(phantoms, tmp_path / "twice", "train.stop_at_step=2"), weights_dir=tmp_path / "w2")
    assert not stopped.finished and stopped.step == 2 and not (tmp_path / "w2" / "b.pth").exists()
    resumed = train_sr("b", _cfg(phantoms, tmp_path / "twice"), weights_dir=tmp_path / "w2", resume=True)
    assert resumed.finished and resumed.step == 4
    a = torch.load(once.path, weights_only=True)["params_ema"]
    b = torch.load(resumed.path, weights_only=True)["params_ema"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert once.quality == resumed.quality
    assert once.sha256 == resumed.sha256  # equal weights, equal file: the sha256 a palm set records


def test_gan_loss_trains_and_resumes(phantoms, tmp_path):
    cfg = _cfg(phantoms, tmp_path / "run", "loss.gan=0.1", "optim.d_feat=4", "train.stop_at_step=2")
    assert train_sr("g", cfg, weights_dir=tmp_path / "w").step == 2
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert {"net_d", "optim_d"} <= set(state)
    done = train_sr("g", _cfg(phantoms, tmp_path / "run", "loss.gan=0.1", "optim.d_feat=4"),
                    weights_dir=tmp_path / "w", resume=True)
    assert done.finished


def test_init_from_a_manifest_network(phantoms, tmp_path, make_sr_weights):
    wd = tmp_path / "w"
    wd.mkdir()
    make_sr_weights(wd)
    from twostage.sr.network import build_network

    cfg = _cfg(phantoms, tmp_path / "run", "net.num_feat=8", "net.num_conv=2", "net.init=vgg-x4")
    net = build_network(cfg, wd)
    official = torch.load(wd / "vgg-x4.pth", weights_only=True)["params_ema"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in official.items())
    with pytest.raises(TwostageError, match="net.init=vgg-x4"):
        build_network(_cfg(phantoms, tmp_path / "run", "net.init=vgg-x4"), wd)  # num_feat 4 != 8


# --------------------------------------------------------------------------- the command

def test_cli_trains_and_reports(phantoms, tmp_path, capsys):
    wd = tmp_path / "w"
    args = ["train-sr", str(phantoms), "--out", "cli-x4", "--stage", "demo-sr", "--weights-dir", str(wd),
            "--run", str(tmp_path / "run")] + [a for t in TINY for a in ("--set", t)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out PSNR" in out and "bicubic" in out and "--upscaler cli-x4" in out
    assert (wd / "cli-x4.pth").is_file()
    assert main(args) == 2  # same name again: refused without --overwrite
    assert "already has a network" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["train-sr"], "give the dataset"),
    (["train-sr", "{data}", "--out", "bicubic"], "built-in bicubic"),
    (["train-sr", "{data}", "--out", "RealESRGAN_x4plus"], "official network"),
    (["train-sr", "{data}", "--out", "../x"], "upscaler name"),
    (["train-sr", "{data}", "--out", "x", "--set", "net.num_fet=3"], "did you mean 'net.num_feat'"),
    (["train-sr", "{data}", "--out", "x", "--set", "data.gt_size=100"], "data.gt_size=100"),
    (["train-sr", "{tmp}/nope", "--out", "x"], "no such dataset"),
    (["train-sr", "{data}", "--out", "x", "--resume"], "no train-sr run to resume"),
    (["train", "--stage", "demo-sr"], "twostage train-sr"),
])
def test_cli_errors_are_one_line(phantoms, tmp_path, capsys, argv, message):
    argv = [a.format(data=phantoms, tmp=tmp_path) for a in argv]
    if argv[0] == "train-sr" and len(argv) > 1:
        argv += ["--weights-dir", str(tmp_path / "w"), "--run", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_existing_run_needs_resume_or_overwrite(phantoms, tmp_path):
    train_sr("r", _cfg(phantoms, tmp_path / "run", "train.stop_at_step=1"), weights_dir=tmp_path / "w")
    with pytest.raises(TwostageError, match="--resume to continue"):
        train_sr("r", _cfg(phantoms, tmp_path / "run"), weights_dir=tmp_path / "w")
    with pytest.raises(TwostageError, match="changed config"):
        train_sr("r", _cfg(phantoms, tmp_path / "run", "net.num_feat=5"), weights_dir=tmp_path / "w", resume=True)


def test_help_config_lists_degradation_keys():
    proc = run_cli("train-sr", "--help-config", timeout=120)
    assert proc.returncode == 0 and "degradation:" in proc.stdout and "jpeg_range2" in proc.stdout


@pytest.mark.slow
def test_demo_sized_training_beats_bicubic_on_held_out_crops(tmp_path):
    """stages/demo-sr.yaml as the demo runs it (400 steps on 512² phantoms): the network must
    beat bicubic on the held-out IDs' palm regions, on clean and on degraded inputs."""
    data = synthesize(tmp_path / "data", n=16, size=512, seed=0)
    result = train_sr("demo-check", load_sr_config("demo-sr", data=str(data), run=str(tmp_path / "run")),
                      weights_dir=tmp_path / "w")
    for kind in ("clean", "degraded"):
        q = result.quality[kind]
        assert q["network"]["psnr"] > q["bicubic"]["psnr"] + 0.3, result.quality
        assert q["network"]["ssim"] > q["bicubic"]["ssim"], result.quality


def test_infer_runs_a_palm_model_recorded_with_the_trained_upscaler(phantoms, tmp_path, make_tiny_checkpoint,
                                                                   capsys, monkeypatch):
    """The palm checkpoint's record names the trained network: infer rebuilds it from the weights
    folder, and without that folder refuses with one line naming it (no CSV)."""
    from twostage.classes import CLASSES, PALM_CLASSES

    wd = tmp_path / "weights"
    result = train_sr("xray-tiny", _cfg(phantoms, tmp_path / "run"), weights_dir=wd)
    g = make_tiny_checkpoint(tmp_path / "global.pt", "global")
    palm = make_tiny_checkpoint(tmp_path / "palm.pt", "palm", classes=PALM_CLASSES)
    ckpt = torch.load(palm, weights_only=True)
    ckpt["meta"]["palm_set"] = {"upscaler": "xray-tiny", "scale": 4, "weight_sha256": result.sha256, "context": 1.5}
    torch.save(ckpt, palm)
    args = ["infer", str(phantoms), "--split", "train", "--global", str(g), "--palm", str(palm), "--fuse"]
    out = tmp_path / "fused.csv"
    assert main([*args, "--weights-dir", str(wd), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1 + 6 * len(CLASSES)
    monkeypatch.setenv("TWOSTAGE_WEIGHTS", str(tmp_path / "empty"))
    assert main([*args, "--out", str(tmp_path / "no.csv")]) == 2
    err = capsys.readouterr().err
    assert "xray-tiny" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "no.csv").exists()


def test_weights_lists_the_trained_network(phantoms, tmp_path, capsys):
    wd = tmp_path / "weights"
    train_sr("xray-tiny", _cfg(phantoms, tmp_path / "run"), weights_dir=wd)
    assert main(["weights", "--weights-dir", str(wd)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("xray-tiny"))
    assert " ok " in line and "train-sr, 4 steps on" in line


def test_a_trained_name_may_not_shadow_a_manifest_name(tmp_path, make_sr_weights):
    wd = tmp_path / "w"
    wd.mkdir()
    make_sr_weights(wd)
    (wd / W.TRAINED_NAME).write_text(yaml.safe_dump({"weights": {"vgg-x4": {
        "file": "vgg-x4.pth", "arch": "SRVGGNetCompact", "scale": 4, "sha256": "0" * 64, "url": None,
        "trained_on": {"data": "x"}}}}))
    with pytest.raises(TwostageError, match="also named in the manifest"):
        W.all_specs(wd)


def test_interrupted_run_saves_its_state_and_resumes(phantoms, tmp_path):
    """Ctrl-C: exit 130 with the state saved; --resume finishes the run."""
    import signal
    import time

    wd, run = tmp_path / "w", tmp_path / "run"
    sets = [a for t in [*TINY, "train.steps=100000", "train.save_every=100000"] for a in ("--set", t)]
    argv = twostage_cmd("train-sr", phantoms, "--out", "int", "--stage", "demo-sr", "--weights-dir", wd, "--run", run, *sets)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.csv").is_file() and time.time() < deadline:  # training has started
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    step = torch.load(run / "state.pt", weights_only=True)["step"]
    assert step >= 2 and not (wd / "int.pth").exists()
    sets = [a for t in [*TINY, "train.steps=100000", "train.save_every=100000", f"train.stop_at_step={step + 1}"]
            for a in ("--set", t)]
    argv = argv[:argv.index("--set")] + sets + ["--resume"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"stopped at step {step + 1}/100000" in done.stdout, done.stderr[-2000:]
    # the state Ctrl-C saved lies on the uninterrupted run's path: the same weights one step later
    straight = train_sr("s", _cfg(phantoms, tmp_path / "straight", "train.steps=100000", "train.save_every=100000",
                                  f"train.stop_at_step={step + 1}"), weights_dir=tmp_path / "w3")
    a = torch.load(run / "state.pt", weights_only=True)["ema"]
    b = torch.load(straight.run / "state.pt", weights_only=True)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_overwrite_never_deletes_a_folder_train_sr_did_not_make(phantoms, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.yaml").write_text("precious: true\n")
    with pytest.raises(TwostageError, match="not a train-sr run folder"):
        train_sr("o", _cfg(phantoms, run), weights_dir=tmp_path / "w", overwrite=True)
    assert (run / "config.yaml").read_text() == "precious: true\n"


def test_rrdbnet_trains_and_loads(phantoms, tmp_path):
    wd = tmp_path / "w"
    result = train_sr("rrdb-tiny", _cfg(phantoms, tmp_path / "run", "net.arch=RRDBNet", "net.scale=2", "net.num_block=1",
                                        "net.num_grow_ch=4", "train.steps=2", "data.val_size=96"), weights_dir=wd)
    up = make_upscaler("rrdb-tiny", weights_dir=wd)
    assert up.scale == 2 and up(np.zeros((20, 30), np.uint8)).shape == (40, 60)
    assert yaml.safe_load((wd / W.TRAINED_NAME).read_text())["weights"]["rrdb-tiny"]["params"]["num_block"] == 1
    assert result.quality["clean"]["bicubic"]["psnr"] > 0


def test_sharpened_targets_change_what_is_learnt(phantoms, tmp_path):
    plain = train_sr("p", _cfg(phantoms, tmp_path / "plain", "train.steps=2"), weights_dir=tmp_path / "w1")
    usm = train_sr("u", _cfg(phantoms, tmp_path / "usm", "train.steps=2", "loss.gt_usm=true"), weights_dir=tmp_path / "w2")
    a = torch.load(plain.path, weights_only=True)["params_ema"]
    b = torch.load(usm.path, weights_only=True)["params_ema"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
