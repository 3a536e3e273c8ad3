"""Pretrained encoders through smp/timm's own download path, never touching the network.

Every test runs offline (HF_HUB_OFFLINE, torch.hub's downloader replaced) against caches in
tmp_path, pre-filled where needed with random-init weights written in the exact layout
huggingface_hub (models--org--name/{blobs,refs,snapshots}) or torch.hub (checkpoints/) uses.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.error
from pathlib import Path

import pytest
import torch

from twostage.errors import TwostageError
from twostage.models import build_model
from twostage.pretrained import IMAGENET_NORMALIZATION, LITE0_NORMALIZATION, default_normalization

TINY = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def caches(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty, offline Hugging Face and torch.hub caches under tmp_path."""
    from huggingface_hub import constants

    hf_home, torch_home = tmp_path / "hf", tmp_path / "torch"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    # huggingface_hub reads these environment variables once, at import.
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_download(url, *args, **kwargs):
        raise urllib.error.URLError(f"test: no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return {"hf": hf_home / "hub", "torch": torch_home / "hub" / "checkpoints"}


def write_hub_repo(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Write files as huggingface_hub caches them: blobs/<sha256>, snapshots/<commit>/<name>
    (symlinks to the blobs) and refs/main holding the commit hash."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return folder


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def smp_settings(encoder: str, weights: str) -> dict:
    from segmentation_models_pytorch.encoders import encoders

    return encoders[encoder]["pretrained_settings"][weights]


def prefill_smp(cache: Path, encoder: str, weights: str, mean, std) -> dict[str, torch.Tensor]:
    """smp 0.6 fetches config.json and model.safetensors at the settings' pinned revision."""
    from segmentation_models_pytorch.encoders import get_encoder

    torch.manual_seed(1234)
    state = {k: v.clone() for k, v in get_encoder(encoder, weights=None).state_dict().items()}
    s = smp_settings(encoder, weights)
    config = {"input_space": "RGB", "input_range": [0, 1], "mean": list(mean), "std": list(std)}
    write_hub_repo(cache, s["repo_id"], {"config.json": json.dumps(config).encode(),
                                          "model.safetensors": safetensors_bytes(state)}, commit=s["revision"])
    return state


def assert_same_tensors(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got and set(got) <= set(expected)
    for k, v in got.items():
        assert torch.equal(v, expected[k]), k


def test_smp_encoder_loads_imagenet_weights_from_the_hub_cache(caches):
    import segmentation_models_pytorch as smp

    state = prefill_smp(caches["hf"], "resnet18", "imagenet", IMAGENET_NORMALIZATION["mean"],
                        IMAGENET_NORMALIZATION["std"])
    model = build_model("Unet", "resnet18", 2, encoder_weights="imagenet", **TINY)
    enc = model.net.encoder.state_dict()
    assert set(enc) == set(state)
    assert all(torch.equal(enc[k], state[k]) for k in state)
    # Normalisation: what smp itself reads for these weights (its config.json, now cached).
    params = smp.encoders.get_preprocessing_params("resnet18", "imagenet")
    assert default_normalization("imagenet", "resnet18") == {"mean": params["mean"], "std": params["std"]}


def test_normalization_follows_the_weights(caches):
    imagenet = {k: list(v) for k, v in IMAGENET_NORMALIZATION.items()}
    inception = {k: list(v) for k, v in LITE0_NORMALIZATION.items()}
    # Without a cached config: the statistics smp's settings have always listed / timm's cfg.
    assert default_normalization("imagenet", "resnet18") == imagenet
    assert default_normalization("advprop", "efficientnet-b0") == inception
    assert default_normalization("imagenet", "inceptionv4") == inception
    assert default_normalization("imagenet", "tu-tf_efficientnet_lite0") == inception
    assert default_normalization("imagenet", "tu-resnet18") == imagenet
    assert default_normalization("imagenet-lite0", "tu-efficientnet_lite0") == inception
    assert default_normalization("imagenet-lite0") == inception
    assert default_normalization(None) == default_normalization("none", "resnet18") == imagenet
    assert default_normalization("/some/encoder.pt", "resnet18") == imagenet
    assert default_normalization("imagenet", "no-such-encoder") == imagenet
    # smp 0.6 keeps mean/std in each hub repo's config.json: once cached, it is what counts.
    prefill_smp(caches["hf"], "resnet18", "ssl", [0.4, 0.4, 0.4], [0.2, 0.3, 0.4])
    assert default_normalization("ssl", "resnet18") == {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.3, 0.4]}
    assert not any(caches["torch"].parent.parent.glob("**/*"))  # looked up, nothing fetched


@pytest.mark.parametrize("weights", ["imagenet", "tv_in1k"])
def test_timm_encoder_loads_weights_from_the_hub_cache(caches, weights):
    import timm

    cfg = timm.models.get_pretrained_cfg("resnet18" if weights == "imagenet" else f"resnet18.{weights}")
    torch.manual_seed(99)
    state = {k: v.clone() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    # timm asks the hub for model.safetensors first (pytorch_model.bin only if that is missing).
    write_hub_repo(caches["hf"], cfg.hf_hub_id, {"model.safetensors": safetensors_bytes(state)})
    model = build_model("Unet", "tu-resnet18", 2, encoder_weights=weights, **TINY)
    assert_same_tensors(model.net.encoder.model, state)
    assert default_normalization(weights, "tu-resnet18") == {"mean": list(cfg.mean), "std": list(cfg.std)}


def test_timm_encoder_with_torch_hub_weights(caches):
    import timm

    cfg = timm.models.get_pretrained_cfg("legacy_seresnet18")
    assert cfg.url and not cfg.hf_hub_id  # one of timm's few url-only weights: torch.hub fetches them
    name = cfg.url.rsplit("/", 1)[1]
    with pytest.raises(TwostageError) as err:
        build_model("Unet", "tu-legacy_seresnet18", 2, encoder_weights="imagenet", **TINY)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and str(caches["torch"]) in msg and "TORCH_HOME" in msg
    torch.manual_seed(7)
    state = timm.create_model("legacy_seresnet18", pretrained=False).state_dict()
    caches["torch"].mkdir(parents=True, exist_ok=True)
    torch.save(state, caches["torch"] / name)
    model = build_model("Unet", "tu-legacy_seresnet18", 2, encoder_weights="imagenet", **TINY)
    assert_same_tensors(model.net.encoder.model, state)


@pytest.mark.parametrize("encoder,repo", [("resnet18", "smp-hub/resnet18.imagenet"),
                                          ("tu-resnet18", "timm/resnet18.a1_in1k")])
def test_offline_with_an_empty_cache_is_one_line(caches, encoder, repo):
    with pytest.raises(TwostageError) as err:
        build_model("Unet", encoder, 2, encoder_weights="imagenet", **TINY)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"model.encoder_weights=imagenet for encoder {encoder}: {repo} is not in the "
                          f"Hugging Face cache {caches['hf']} and cannot be downloaded (HF_HUB_OFFLINE is set)")
    assert "pre-fill that cache" in msg and "imagenet-lite0" in msg and "encoder_weights=none" in msg


def test_unknown_weights_name_lists_what_the_encoder_offers(caches):
    with pytest.raises(TwostageError) as err:
        build_model("Unet", "resnet18", 2, encoder_weights="advprop", **TINY)
    assert "\n" not in str(err.value)
    assert "not a pretrained weights name of encoder resnet18 (it offers imagenet, ssl, swsl)" in str(err.value)
    with pytest.raises(TwostageError, match=r"encoder tu-resnet18 \(it offers imagenet, a1_in1k, .*tv_in1k\)"):
        build_model("Unet", "tu-resnet18", 2, encoder_weights="in1k_typo", **TINY)
    with pytest.raises(TwostageError, match="needs encoder tu-efficientnet_lite0"):
        build_model("Unet", "resnet18", 2, encoder_weights="imagenet-lite0")


def test_checkpoint_meta_records_the_normalization_of_the_weights(caches, tmp_path):
    from twostage.config import load_config
    from twostage.train.run import stage_meta

    prefill_smp(caches["hf"], "resnet18", "ssl", [0.4, 0.45, 0.5], [0.2, 0.25, 0.3])
    cfg = load_config("global", overrides=["model.arch=Unet", "model.encoder=resnet18", "model.encoder_weights=ssl"],
                      data=str(tmp_path), out=str(tmp_path / "run"))
    assert stage_meta(cfg, {})["normalization"] == {"mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]}
    cfg = load_config("global", overrides=["model.encoder=tu-tf_efficientnet_lite0", "model.encoder_weights=imagenet",
                                           "model.mean=[0.1, 0.2, 0.3]"], data=str(tmp_path), out=str(tmp_path / "r"))
    assert stage_meta(cfg, {})["normalization"] == {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}


def test_cli_train_offline_with_an_empty_cache_is_one_line_on_stderr(caches, tiny_dataset, tmp_path, capsys):
    from twostage.cli import main

    rc = main(["--quiet", "train", "--stage", "global", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
               "--epochs", "1", "--workers", "0", "--input-size", "64", "--device", "cpu",
               "--set", "model.arch=Unet", "--set", "model.encoder=resnet18", "--set", "model.encoder_weights=imagenet",
               "--set", "model.kwargs={encoder_depth: 3, decoder_channels: [16, 8, 8]}", "--set", "data.folds=2"])
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: model.encoder_weights=imagenet for encoder resnet18: smp-hub/resnet18.imagenet")
    assert str(caches["hf"]) in lines[0] and "HF_HUB_OFFLINE" in lines[0]
