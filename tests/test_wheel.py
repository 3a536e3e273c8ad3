"""The built wheel works on its own, away from the checkout: the stage configs and the weights
manifest ship inside the package (only those yaml files), and weight files go to
$TWOSTAGE_WEIGHTS or the per-user cache folder, never site-packages.

The wheel is built from a copy of the source (building writes build/ and *.egg-info) with the
venv's setuptools (no build isolation, no network), installed with `pip --target` and run with
the venv's python from a folder outside the checkout, HOME and XDG_CACHE_HOME in tmp folders.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCE = ("pyproject.toml", "README.md", "twostage", "stages", "weights")


def run(*args: str, env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel from a copy of the source, install it into site/; returns paths and an env."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pth", "pins.yaml")
    for name in SOURCE:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, src / name)
    # things a developer's weights/ holds that must not ship
    (src / "weights" / "RealESRGAN_x4plus.pth").write_bytes(b"not a real weight file")
    (src / "weights" / "pins.yaml").write_text("RealESRGAN_x4plus: " + "0" * 64 + "\n")
    dist, site = tmp / "dist", tmp / "site"
    build = run("-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src),
                env=os.environ.copy(), cwd=tmp)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("twostage-*.whl")
    inst = run("-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(wheel),
               env=os.environ.copy(), cwd=tmp)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TWOSTAGE_WEIGHTS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), HOME=str(tmp / "home"), XDG_CACHE_HOME=str(tmp / "cache"),
               NO_ALBUMENTATIONS_UPDATE="1", PYTHONWARNINGS="ignore")
    return {"tmp": tmp, "wheel": wheel, "site": site, "cwd": elsewhere, "env": env,
            "cache": tmp / "cache" / "twostage" / "weights"}


def test_wheel_ships_code_and_only_the_yaml_data(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    code = {p.relative_to(REPO).as_posix() for p in (REPO / "twostage").rglob("*.py")}
    assert code - names == set(), "a module is missing from the wheel: add its package to pyproject.toml"
    data = {n for n in names if n.startswith("twostage/") and not n.endswith(".py")}
    assert data == {f"twostage/stages/{p.name}" for p in (REPO / "stages").glob("*.yaml")} | {
        "twostage/manifests/manifest.yaml"}
    assert not [n for n in names if n.endswith((".pth", "README.md", "pins.yaml"))]
    assert not (installed["tmp"] / "site" / "weights").exists()


def test_installed_package_resolves_its_own_files(installed, tmp_path):
    script = (
        "import os, twostage\n"
        "from twostage import config\nfrom twostage.sr import weights\n"
        "from twostage.errors import TwostageError\n"
        "print(twostage.__file__); print(config.stage_file('global')); print(weights.weights_dir())\n"
        "print(weights.manifest_path()); print(weights.in_checkout())\n"
        "try:\n    config.stage_file('nope')\nexcept TwostageError as e:\n    print(e)\n"
        "del os.environ['XDG_CACHE_HOME']; print(weights.weights_dir())\n"
        "os.environ['TWOSTAGE_WEIGHTS'] = os.environ['ALT']; print(weights.weights_dir())\n"
    )
    res = run("-c", script, env={**installed["env"], "ALT": str(tmp_path / "alt")}, cwd=installed["cwd"])
    assert res.returncode == 0, res.stderr
    pkg, stage, wdir, manifest, checkout, unknown, home_dir, alt = res.stdout.splitlines()
    site = installed["site"]
    assert Path(pkg).parent == site / "twostage" and REPO not in Path(pkg).parents
    assert Path(stage) == site / "twostage" / "stages" / "global.yaml"
    assert Path(manifest) == site / "twostage" / "manifests" / "manifest.yaml"
    assert Path(wdir) == installed["cache"] and checkout == "False"
    assert "available: demo-global, demo-global-patch, demo-palm, demo-sr, global, global-patch, palm, sr" in unknown
    assert Path(home_dir) == Path(installed["env"]["HOME"]) / ".cache" / "twostage" / "weights"
    assert Path(alt) == tmp_path / "alt"


def test_installed_cli_weights_and_stage(installed):
    env, cwd, cache = installed["env"], installed["cwd"], installed["cache"]
    res = run("-m", "twostage", "weights", env=env, cwd=cwd)
    assert res.returncode == 0, res.stderr
    assert f"weights folder: {cache} (manifest {installed['site'] / 'twostage' / 'manifests'}" in res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    assert {r[0] for r in rows} == {"RealESRGAN_x4plus", "RealESRGAN_x2plus", "realesr-general-x4v3"}
    assert all(r[1] == "missing" and Path(r[2]).parent == cache for r in rows)
    # the stage config loads; the command fails later, on the missing data folder, in one line
    res = run("-m", "twostage", "train", "--stage", "global", "--data", str(cwd / "no-data"),
              "--out", str(cwd / "run"), env=env, cwd=cwd)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == \
        f"error: {cwd / 'no-data'}: data folder does not exist", res.stderr
    assert "Traceback" not in res.stderr


def test_installed_fetch_and_pin_write_the_user_cache(installed, http_dir, tmp_path):
    srv, base = http_dir
    env, cwd, cache = installed["env"], installed["cwd"], installed["cache"]
    (srv / "tiny.pth").write_bytes(b"tiny weights " * 100)
    sha = hashlib.sha256((srv / "tiny.pth").read_bytes()).hexdigest()
    manifest = tmp_path / "manifest.yaml"  # not in the weights folder: --manifest
    manifest.write_text(yaml.safe_dump({"weights": {
        "tiny": {"file": "tiny.pth", "arch": "SRVGGNetCompact", "scale": 4, "url": base + "tiny.pth", "sha256": None},
    }}))
    shutil.rmtree(cache, ignore_errors=True)
    # `twostage weights --fetch tiny`, then `--pin tiny`, in one process (the CLI's imports take seconds)
    script = ("import sys; from twostage.cli import main\n"
              "m = ['weights', '--manifest', sys.argv[1]]\n"
              "sys.exit(main(m + ['--fetch', 'tiny']) or main(m + ['--pin', 'tiny']))\n")
    res = run("-c", script, str(manifest), env=env, cwd=cwd)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"tiny: {cache / 'tiny.pth'} sha256 {sha}", f"tiny: pinned sha256 {sha}"]
    assert yaml.safe_load((cache / "pins.yaml").read_text()) == {"tiny": sha}
    assert sorted(p.name for p in cache.iterdir()) == ["pins.yaml", "tiny.pth"]
    assert not list(installed["site"].rglob("*.pth")) and not list(installed["site"].rglob("pins.yaml"))
