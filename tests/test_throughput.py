"""What makes the chain run at the speed of its networks (docs/DESIGN.md §3 "Inference on a
GPU"), checked on the CPU: images uploaded once, a network upscaler's crop never copied
through host memory, the palm crops of a batch in one forward, the CUDA-only tuning branches
(channels-last, cuDNN autotuning) exercised with the device patched, the RLE made in a thread
without changing the CSV, models built without random initialisation, opt-in torch.compile."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from twostage.checkpoint import load_checkpoint, save_checkpoint
from twostage.classes import PALM_CLASSES
from twostage.sr.upscale import make_upscaler


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_tiny_checkpoint, make_sr_weights) -> dict:
    """Phantoms of two sizes, a tiny global checkpoint, and a tiny palm checkpoint recorded with
    a (tiny) Real-ESRGAN compact x4 upscaler."""
    from twostage.data.synth import synthesize

    root = tmp_path_factory.mktemp("throughput")
    wdir = root / "weights"
    wdir.mkdir()
    make_sr_weights(wdir)
    palm = make_tiny_checkpoint(root / "palm-bicubic.pt", "palm", classes=PALM_CLASSES)
    ck = load_checkpoint(palm, map_location="cpu")
    ck["meta"]["palm_set"] = {**make_upscaler("vgg-x4", weights_dir=wdir).record(), "context": 1.5}
    return {"data": synthesize(root / "DATA", n=5, size=160, seed=4), "weights": wdir,
            "global": make_tiny_checkpoint(root / "global.pt", "global"),
            "palm": save_checkpoint(root / "palm.pt", ck["state_dict"], ck["meta"])}


def run_infer(world, out: Path, **kw) -> Path:
    from twostage.inference.infer import infer

    infer(world["data"], world["global"], out, palm_ckpt=world["palm"], fuse=True, split="train",
          weights_dir=world["weights"], **kw)
    return out


def test_palm_step_never_copies_through_host_memory(world, monkeypatch):
    """From the uploaded images to the palm probabilities, nothing is read back to numpy: the
    crop is cut from the device copy, upscaled and fed to the palm network as a tensor."""
    from twostage.inference.chain import TwoStage
    from twostage.inference.infer import find_images
    from twostage.io.images import read_image

    chain = TwoStage.build(world["global"], world["palm"], weights_dir=world["weights"], calibration="none")
    samples = find_images(world["data"], "train")[:2]
    images = torch.from_numpy(np.stack([read_image(s.image_path) for s in samples]))
    native = chain.native(images)
    boxes = chain.boxes(native, [s.name for s in samples], tuple(images.shape[1:]))

    def host_copy(*a, **k):
        raise AssertionError("a tensor went through numpy between the upload and the palm network")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "numpy", host_copy)
        m.setattr(torch, "from_numpy", host_copy)
        regions = chain.palm_regions(images, boxes)
    assert [tuple(r.shape) for r in regions] == [(len(PALM_CLASSES), b.side, b.side) for b in boxes]
    # the same as the one-image path from the numpy image
    for image, box, region in zip(images.numpy(), boxes, regions):
        one = chain.palm.probs(chain.palm.crop_upscaled(image, box), box, chain.device)
        torch.testing.assert_close(region, one, atol=1e-5, rtol=0)


def test_palm_crops_of_a_batch_share_one_forward(world, tmp_path, monkeypatch):
    """--batch-size 3: one palm forward per batch (not per image), and the CSV equals the
    batch-size-1 one."""
    from twostage.inference.chain import PalmStage

    ref = run_infer(world, tmp_path / "b1.csv")
    calls = []
    real = PalmStage.regions

    def counted(self, crops, boxes, device):
        calls.append(len(crops))
        return real(self, crops, boxes, device)

    monkeypatch.setattr(PalmStage, "regions", counted)
    out = run_infer(world, tmp_path / "b3.csv", batch_size=3)
    assert calls == [3, 2]
    assert out.read_bytes() == ref.read_bytes()


def test_cuda_tuning_branches_on_a_patched_device(world):
    """What `TwoStage.load` does on CUDA, run on the CPU: the networks go channels-last and the
    input follows; cuDNN autotuning is on only inside the segmentation networks' calls."""
    from twostage.devices import cudnn_autotune
    from twostage.models import Predictor

    ref = Predictor.from_checkpoint(world["global"])
    pred = Predictor.from_checkpoint(world["global"])
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 80, 96), dtype=np.uint8))
    pred.device = torch.device("cuda")  # the default of `tune` is decided by the device
    pred.tune()
    pred.device = torch.device("cpu")
    assert pred.channels_last and not ref.channels_last
    seen = []
    conv = next(m for m in pred.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    torch.testing.assert_close(pred.native_probs(x), ref.native_probs(x), atol=1e-5, rtol=0)
    assert seen == [True]
    before = torch.backends.cudnn.benchmark
    with cudnn_autotune(torch.device("cuda")):
        assert torch.backends.cudnn.benchmark
    with cudnn_autotune(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark == before
    assert torch.backends.cudnn.benchmark == before
    cpu = Predictor.from_checkpoint(world["global"]).tune()
    assert not cpu.channels_last  # on the CPU channels-last would change the CSV's last bits


def test_checkpoint_loads_without_initialising(world, monkeypatch):
    """The network is built on the meta device and given the file's tensors: its random
    initialisation touches no real memory, every tensor ends up real, and the weights are the file's."""
    from twostage.models import Predictor

    seen = []

    def watch(fn):
        def init(tensor, *a, **k):
            seen.append(tensor.is_meta)
            return fn(tensor, *a, **k)
        return init

    with monkeypatch.context() as m:
        for name in ("kaiming_normal_", "kaiming_uniform_", "xavier_uniform_", "normal_", "uniform_", "constant_",
                     "zeros_", "ones_", "trunc_normal_"):
            m.setattr(torch.nn.init, name, watch(getattr(torch.nn.init, name)))
        pred = Predictor.from_checkpoint(world["global"])
    assert seen and all(seen)
    sd = load_checkpoint(world["global"], map_location="cpu")["state_dict"]
    got = pred.model.state_dict()
    assert not any(t.is_meta for t in got.values())
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_rle_thread_keeps_order_and_bytes_with_skipped_images(world, tmp_path):
    """The RLE of each image is made in a thread: rows stay in order, a skipped (unreadable)
    image in the middle is written empty in its place."""
    import shutil

    from twostage.inference.infer import find_images, infer
    from twostage.rle import read_csv

    data = tmp_path / "DATA"
    shutil.copytree(world["data"], data)
    samples = find_images(data, "train")
    ref = infer(data, world["global"], tmp_path / "ref.csv", split="train")
    samples[2].image_path.write_bytes(b"not a png")
    summary = infer(data, world["global"], tmp_path / "out.csv", split="train", skip_bad=True)
    got, want = read_csv(tmp_path / "out.csv"), read_csv(Path(ref.out))
    assert list(got) == list(want) == [s.name for s in samples]
    assert [Path(p).name for p in summary.skipped] == [samples[2].image_path.name]
    assert set(got[samples[2].name].values()) == {""}
    assert all(got[n] == want[n] for n in got if n != samples[2].name)


@pytest.mark.slow
def test_compile_is_opt_in_and_gives_the_same_masks(world, tmp_path):
    """--compile (torch.compile, inductor on the CPU): the CSV matches the eager one (compiled
    kernels may round differently: per-class Dice >= 0.999)."""
    from twostage.classes import CLASSES
    from twostage.metrics import dice_per_class
    from twostage.rle import decode, read_csv

    eager = read_csv(run_infer(world, tmp_path / "eager.csv"))
    compiled = read_csv(run_infer(world, tmp_path / "compiled.csv", compile=True))
    for name in eager:
        a = np.stack([decode(eager[name][c], (160, 160)) for c in CLASSES])
        b = np.stack([decode(compiled[name][c], (160, 160)) for c in CLASSES])
        assert dice_per_class(b, a).min() >= 0.999


def test_compile_failure_is_one_line(monkeypatch):
    """--compile where the C++ compiler is missing: one line naming the way out (a one-layer
    network: the failure comes at code generation, whatever the network)."""
    from torch._inductor import config

    from twostage.errors import TwostageError
    from twostage.models import Predictor
    from twostage.pretrained import default_normalization

    meta = {"classes": ["a"], "input_size": 16, "model": {"in_channels": 3}, "normalization": default_normalization(None)}
    pred = Predictor(torch.nn.Conv2d(3, 1, 3, padding=1), meta).tune(compile=True)
    monkeypatch.setattr(config.cpp, "cxx", ("/nonexistent/c++",))
    torch._dynamo.reset()
    with pytest.raises(TwostageError, match=r"^--compile: torch.compile failed .*run without --compile$"):
        pred.native_probs(torch.zeros(1, 16, 16, dtype=torch.uint8))
    torch._dynamo.reset()
