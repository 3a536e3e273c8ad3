"""Upscalers (twostage.sr.upscale) and the weights manifest (twostage.sr.weights), with random-init
networks saved exactly like the official Real-ESRGAN files ({"params_ema": state_dict})."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from twostage.cli import main as cli_main
from twostage.errors import TwostageError
from twostage.io.files import sha256_file
from twostage.sr import weights as W
from twostage.sr.upscale import make_upscaler


@pytest.fixture
def wdir(tmp_path: Path, make_sr_weights) -> Path:
    d = tmp_path / "weights"
    d.mkdir()
    make_sr_weights(d)
    return d


def crop(h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


@pytest.mark.parametrize("name,scale", [("rrdb-x4", 4), ("rrdb-x2", 2), ("vgg-x4", 4)])
def test_realesrgan_upscalers_through_manifest(wdir, name, scale):
    up = make_upscaler(name, weights_dir=wdir)
    for h, w in ((32, 32), (33, 27)):  # odd sizes exercise RealESRGANer's mod padding
        out = up(crop(h, w))
        assert out.shape == (h * scale, w * scale) and out.dtype == np.uint8
    assert up.record() == {"upscaler": name, "scale": scale, "weight_sha256": sha256_file(wdir / f"{name}.pth")}
    np.testing.assert_array_equal(up(crop()), up(crop()))  # pure: same input, same output


def test_tiling_matches_whole_crop(wdir):
    img = crop(40, 40)
    whole = make_upscaler("vgg-x4", weights_dir=wdir)(img)
    tiled = make_upscaler("vgg-x4", tile=16, tile_pad=10, weights_dir=wdir)(img)
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1
    padded = make_upscaler("vgg-x4", pre_pad=4, weights_dir=wdir)(img)
    assert padded.shape == whole.shape


def test_bit_depth_from_dtype(wdir):
    up = make_upscaler("vgg-x4", weights_dir=wdir)
    img8 = crop()
    out8 = up(img8)
    out16 = up(img8.astype(np.uint16) * 257)
    assert out16.dtype == np.uint16
    assert np.abs(out16 / 65535.0 - out8 / 255.0).max() <= 1.5 / 255
    dark = up(np.full((16, 16), 200, np.uint16))  # a dark 16-bit crop is not read as 8-bit
    assert dark.dtype == np.uint16


def test_never_half_on_cpu(wdir, monkeypatch):
    def no_half(self, *a, **k):
        raise AssertionError("fp16 used on CPU")

    monkeypatch.setattr(torch.nn.Module, "half", no_half)
    monkeypatch.setattr(torch.Tensor, "half", no_half)
    assert make_upscaler("rrdb-x4", device="cpu", weights_dir=wdir)(crop(16, 16)).shape == (64, 64)


def test_non_finite_output_is_an_error(tmp_path, make_sr_weights):
    manifest = make_sr_weights(tmp_path)
    sd = torch.load(tmp_path / "vgg-x4.pth", weights_only=True)["params_ema"]
    sd = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    torch.save({"params": sd}, tmp_path / "vgg-x4.pth")  # also: 'params' key accepted
    m = yaml.safe_load(manifest.read_text())
    m["weights"]["vgg-x4"]["sha256"] = sha256_file(tmp_path / "vgg-x4.pth")
    manifest.write_text(yaml.safe_dump(m))
    with pytest.raises(TwostageError, match="non-finite"):
        make_upscaler("vgg-x4", weights_dir=tmp_path)(crop(8, 8))


def test_corrupt_missing_unknown_and_bad_scale(wdir):
    path = wdir / "rrdb-x4.pth"
    expected = yaml.safe_load((wdir / "manifest.yaml").read_text())["weights"]["rrdb-x4"]["sha256"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TwostageError) as e:
        make_upscaler("rrdb-x4", weights_dir=wdir)
    msg = str(e.value)
    assert str(path) in msg and expected in msg and "https://example.invalid/rrdb-x4.pth" in msg
    path.unlink()
    with pytest.raises(TwostageError, match="missing") as e:
        make_upscaler("rrdb-x4", weights_dir=wdir)
    assert "rrdb-x4.pth" in str(e.value) and "example.invalid" in str(e.value)
    with pytest.raises(TwostageError, match="bicubic, rrdb-x2, rrdb-x4, vgg-x4"):
        make_upscaler("esrgan-x8", weights_dir=wdir)
    with pytest.raises(TwostageError, match="scale 3"):
        make_upscaler("vgg-x4", scale=3, weights_dir=wdir)


class Evil:
    """Not a tensor: torch.load(weights_only=True) must refuse to unpickle it."""


def test_unsafe_pickle_refused(wdir):
    sd = torch.load(wdir / "vgg-x4.pth", weights_only=True)
    torch.save({"params_ema": sd["params_ema"], "extra": Evil()}, wdir / "vgg-x4.pth")
    with pytest.raises(TwostageError, match="not a safe weights file") as e:
        W.load_state_dict(wdir / "vgg-x4.pth")
    assert "\x1b" not in str(e.value)


def test_unpinned_needs_trust_or_pin(wdir):
    m = yaml.safe_load((wdir / "manifest.yaml").read_text())
    m["weights"]["vgg-x4"]["sha256"] = None
    (wdir / "manifest.yaml").write_text(yaml.safe_dump(m))
    with pytest.raises(TwostageError, match="not pinned"):
        make_upscaler("vgg-x4", weights_dir=wdir)
    assert make_upscaler("vgg-x4", weights_dir=wdir, trust_unpinned=True).scale == 4
    assert cli_main(["weights", "--weights-dir", str(wdir), "--pin", "vgg-x4"]) == 0
    assert yaml.safe_load((wdir / W.PINS_NAME).read_text())["vgg-x4"] == sha256_file(wdir / "vgg-x4.pth")
    up = make_upscaler("vgg-x4", weights_dir=wdir)
    assert up.weight_sha256 == sha256_file(wdir / "vgg-x4.pth")


def test_env_weights_dir_and_repo_manifest(wdir, monkeypatch):
    monkeypatch.setenv(W.ENV_WEIGHTS, str(wdir))
    assert make_upscaler("rrdb-x2").scale == 2
    repo = W.load_manifest(W.repo_weights_dir() / "manifest.yaml")
    assert set(repo) == {"RealESRGAN_x4plus", "RealESRGAN_x2plus", "realesr-general-x4v3"}
    assert repo["RealESRGAN_x4plus"].params["num_block"] == 23 and repo["RealESRGAN_x2plus"].scale == 2
    assert repo["realesr-general-x4v3"].arch == "SRVGGNetCompact"


def test_bicubic_deterministic_any_scale():
    img = crop(20, 30)
    for s in (1, 2, 3, 4):
        a, b = make_upscaler("bicubic", scale=s)(img), make_upscaler("bicubic", scale=s)(img)
        assert a.shape == (20 * s, 30 * s) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    up = make_upscaler("bicubic")
    assert up.record() == {"upscaler": "bicubic", "scale": 4, "weight_sha256": None}
    assert up(img.astype(np.uint16) * 257).dtype == np.uint16
    with pytest.raises(TwostageError, match="grayscale"):
        up(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(TwostageError, match="dtype"):
        up(np.zeros((4, 4), np.float32))


def test_weights_cli_lists_states(wdir, capsys):
    (wdir / "rrdb-x2.pth").unlink()
    (wdir / "vgg-x4.pth").write_bytes(b"garbage")
    rc = cli_main(["weights", "--weights-dir", str(wdir)])
    out = capsys.readouterr().out
    assert rc == 1
    states = {line.split()[0]: line.split()[1] for line in out.splitlines() if line and not line.startswith(" ")}
    assert states == {"rrdb-x4": "ok", "rrdb-x2": "missing", "vgg-x4": "bad"}


def test_fetch_from_local_server(tmp_path, http_dir, make_sr_weights):
    srv, base = http_dir
    make_sr_weights(srv, url_base=base)  # the server holds the "official" files
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "manifest.yaml").write_text((srv / "manifest.yaml").read_text())
    assert cli_main(["weights", "--weights-dir", str(dest), "--fetch", "vgg-x4"]) == 0
    assert sha256_file(dest / "vgg-x4.pth") == sha256_file(srv / "vgg-x4.pth")
    assert make_upscaler("vgg-x4", weights_dir=dest)(crop(8, 8)).shape == (32, 32)
    # a server file that does not match the pinned hash: error, nothing written
    (srv / "rrdb-x4.pth").write_bytes(b"tampered")
    with pytest.raises(TwostageError, match="nothing written"):
        W.fetch("rrdb-x4", dest)
    assert not (dest / "rrdb-x4.pth").exists()
    assert not list(dest.glob(".*tmp*"))
    # offline / unreachable: a clear error
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = yaml.safe_load((dest / "manifest.yaml").read_text())
    m["weights"]["rrdb-x2"]["url"] = f"http://127.0.0.1:{port}/rrdb-x2.pth"
    (dest / "manifest.yaml").write_text(yaml.safe_dump(m))
    with pytest.raises(TwostageError, match="download of rrdb-x2 failed"):
        W.fetch("rrdb-x2", dest, timeout=5)


def realesrganer(model, spec, img: np.ndarray, tile: int, pre_pad: int) -> np.ndarray:
    """RealESRGANer's own pre-processing, forward and post-processing of a grey uint8 image."""
    from realesrgan import RealESRGANer

    from twostage.sr.compat import install_functional_tensor_shim

    install_functional_tensor_shim()
    runner = RealESRGANer.__new__(RealESRGANer)  # its __init__ loads weights itself; the rest is its code
    runner.scale, runner.tile_size, runner.tile_pad, runner.pre_pad = spec.scale, tile, 10, pre_pad
    runner.mod_scale, runner.half, runner.device, runner.model = None, False, torch.device("cpu"), model
    with torch.no_grad():
        runner.pre_process(np.repeat((img.astype(np.float32) / 255.0)[:, :, None], 3, axis=2))
        runner.tile_process() if tile else runner.process()
        out = runner.post_process().float().mean(1)[0].clamp_(0, 1).numpy()
    return np.rint(out * 255.0).astype(np.uint8)


@pytest.mark.parametrize("name", ["rrdb-x4", "rrdb-x2", "vgg-x4"])
@pytest.mark.parametrize("tile,pre_pad", [(0, 0), (16, 0), (0, 3)])
def test_same_as_realesrganer(wdir, name, tile, pre_pad, capsys):
    """The torch re-implementation gives the pixels of RealESRGANer's own pre-processing, tiling
    and post-processing (grey as 3 equal channels, channel mean, rounded), from numpy and from a
    tensor."""
    model, spec, _ = W.load_model(name, wdir, W.all_specs(wdir, None)[1], False)
    up = make_upscaler(name, tile=tile, pre_pad=pre_pad, weights_dir=wdir)
    for h, w in ((32, 32), (33, 27)):
        img = crop(h, w, seed=h)
        ref = realesrganer(model, spec, img, tile, pre_pad)
        np.testing.assert_array_equal(up(img), ref)
        np.testing.assert_array_equal(up.tensor(torch.from_numpy(img)).numpy(), ref)


@pytest.mark.parametrize("name,pre_pad", [("rrdb-x4", 0), ("rrdb-x2", 3), ("vgg-x4", 0)])
def test_network_input_has_realesrganers_layout(wdir, name, pre_pad):
    """Equal pixels are not enough: a convolution may round one memory layout of the same values
    differently from another (a channels-last copy rounded 2 of 384,000 pixels of the demo's x4
    crop one level apart, which the small networks above do not show). So the network's input
    must have the shape and strides of RealESRGANer's numpy-made input."""
    model, spec, _ = W.load_model(name, wdir, W.all_specs(wdir, None)[1], False)
    up = make_upscaler(name, pre_pad=pre_pad, weights_dir=wdir)
    seen: list[tuple] = []

    def record(module, args):
        if module is model or type(module) is type(model):
            seen.append((tuple(args[0].shape), args[0].stride(), args[0].dtype))

    img = crop(33, 27, seed=1)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        realesrganer(model, spec, img, 0, pre_pad)
        up(img)
    finally:
        handle.remove()
    assert len(seen) == 2 and seen[0] == seen[1], seen


def test_tensor_input_checked(wdir):
    up = make_upscaler("vgg-x4", weights_dir=wdir)
    with pytest.raises(TwostageError, match="uint8 tensor"):
        up.tensor(torch.zeros(8, 8))
    bic = make_upscaler("bicubic", 2)
    img = crop(9, 7)
    np.testing.assert_array_equal(bic.tensor(torch.from_numpy(img)).numpy(), bic(img))


def test_the_names_users_import_from_twostage_sr():
    """`twostage.sr.make_upscaler` / `Upscaler` / `network_upscaler` kept working when sr.py
    became the package sr/ (the code lives in sr/upscale.py)."""
    import twostage.sr as sr
    from twostage.sr import upscale

    assert (sr.make_upscaler, sr.Upscaler, sr.network_upscaler) == (
        upscale.make_upscaler, upscale.Upscaler, upscale.network_upscaler)
    up = sr.make_upscaler("bicubic", 2)
    assert isinstance(up, sr.Upscaler) and up(np.zeros((4, 6), np.uint8)).shape == (8, 12)
