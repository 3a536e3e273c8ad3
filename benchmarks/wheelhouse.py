"""Gather, on a connected machine, the wheels twostage needs on a machine that has PyTorch but no
network (docs/offline-install.md).

    python benchmarks/wheelhouse.py OUT [--python-version 3.12] [--platform manylinux_2_28_x86_64 ...]
                                        [--have NAME[==VERSION] ...] [--with-torch] [--overwrite]

Run it with the twostage venv's python: basicsr 1.4.2 is a source distribution whose setup.py
imports torch, so its wheel (pure Python) is built here without build isolation. twostage's
wheel is built from a copy of this checkout. Everything else is `pip download --only-binary=:all:`
for the target's Python and platform, resolved by pip from the twostage wheel's requirements
(pyproject.toml's dependencies), with torch and torchvision (and each `--have` package: what the
target already has) replaced by empty placeholder wheels pinned by a constraint, so that pip
neither downloads them nor follows their requirements (torch alone is GBs of CUDA wheels).

pip evaluates environment markers for the Python running it, not for --python-version, so the
result is checked again here with the target's markers and version specifiers: a wheel only this
Python needs is dropped, a requirement only the target has is downloaded, and the wheelhouse is
complete or this script fails. OUT/MANIFEST.txt lists names, versions and sizes.
On the target: pip install --no-index --find-links OUT twostage
"""
from __future__ import annotations

import argparse
import email.parser
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.version import VERSION_PATTERN, Version
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import VERSION_PATTERN, Version

REPO = Path(__file__).resolve().parents[1]
# what tests/test_wheel.py copies: a build in a copy never picks up stale files of build/
SOURCE = ("pyproject.toml", "README.md", "twostage", "stages", "weights")
BASICSR = "basicsr==1.4.2"  # sdist only on PyPI
ON_TARGET = ("torch", "torchvision")
STUB_LOCAL = "twostage.placeholder"
NETWORK_ERRORS = ("Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "No route to host", "Connection refused",
                  "ConnectTimeout", "Read timed out", "ProxyError", "NewConnectionError", "Max retries exceeded")


class Fail(Exception):
    """A one-line error for the user."""


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(args: list[str], what: str, verbose: bool = False) -> str:
    """Run this Python's pip; on failure a one-line Fail (network trouble said as such)."""
    cmd = [sys.executable, "-m", "pip", *args]
    if verbose:
        print("+", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    out = res.stdout + res.stderr
    if verbose:
        print(out, flush=True)
    if res.returncode == 0:
        return out
    for key in NETWORK_ERRORS:
        if key in out:
            reason = out[out.index(key):].splitlines()[0].split("')")[0]
            raise Fail(f"{what}: cannot reach the package index (no network?): {reason[:160]}")
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")] or lines[-1:] or ["(no output)"]
    if "(from versions: none)" in errors[0]:
        raise Fail(f"{what}: pip found no version at all: no network, or the index pip uses does not have it "
                   f"({errors[0].removeprefix('ERROR: ')[:200]})")
    why = errors[0].removeprefix("ERROR: ")[:300]
    if "The conflict is caused by:" in out:
        causes = out.split("The conflict is caused by:", 1)[1].strip().split("\n\n")[0].splitlines()
        why += " (" + "; ".join(c.strip() for c in causes[:3]) + ("; ..." if len(causes) > 3 else "") + ")"
    raise Fail(f"{what} failed: {why} (--verbose shows pip's output)")


def expand_platforms(platforms: list[str]) -> list[str]:
    """Each manylinux tag and the older ones it accepts (pip 23 does not add them for --platform):
    manylinux_2_28_x86_64 -> manylinux_2_28 ... manylinux_2_17 = manylinux2014, ... manylinux1."""
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    aliases = {v: k for k, v in legacy.items()}
    out = []
    for plat in platforms:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", plat) or re.fullmatch(r"(manylinux\d+)_(\w+)", plat)
        if m is None or (not m.group(1).isdigit() and m.group(1) not in aliases):
            out.append(plat)
            continue
        glibc = int(m.group(1)) if m.group(1).isdigit() else aliases[m.group(1)]
        for minor in range(glibc, 4, -1):
            out.append(f"manylinux_2_{minor}_{m.group(2)}")
            if minor in legacy:
                out.append(f"{legacy[minor]}_{m.group(2)}")
    return list(dict.fromkeys(out))


def target_environment(python_version: str | None, platforms: list[str]) -> dict[str, str]:
    """Marker values of the target: this Python's, with the version and platform replaced."""
    env = dict(default_environment())
    if python_version and python_version != env["python_version"]:
        env["python_version"] = python_version
        env["python_full_version"] = python_version + ".0"
    for plat in platforms[:1]:
        if plat.startswith(("manylinux", "musllinux", "linux")):
            machine = re.sub(r"^(manylinux|musllinux)(_\d+_\d+|\d+|1)?_|^linux_", "", plat)
            env.update(sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine=machine)
        elif plat.startswith("macosx"):
            env.update(sys_platform="darwin", platform_system="Darwin", os_name="posix",
                       platform_machine=plat.split("_", 3)[-1])
        elif plat.startswith("win"):
            env.update(sys_platform="win32", platform_system="Windows", os_name="nt",
                       platform_machine={"win_amd64": "AMD64", "win32": "x86", "win_arm64": "ARM64"}.get(plat, ""))
    return env


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist) of a wheel file."""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(names) != 1:
            raise Fail(f"{path.name}: not a wheel (no single .dist-info/METADATA)")
        msg = email.parser.Parser().parsestr(zf.read(names[0]).decode("utf-8", "replace"))
    return msg["Name"], msg["Version"], msg.get_all("Requires-Dist") or []


def closure(roots: list[str], dists: dict[str, tuple[str, list[str]]], env: dict[str, str],
            have: set[str]) -> tuple[set[str], list[tuple[Requirement, str]]]:
    """The distributions reached from `roots` through requirements true in `env`, not going
    through a name in `have` (canonical names). dists: name -> (version, Requires-Dist).
    Returns (reached, unmet): each unmet requirement with a sentence saying why."""
    reached: dict[str, set[str]] = {}  # name -> extras requested
    todo = [(canon(r), frozenset()) for r in roots]
    unmet = []
    while todo:
        name, extras = todo.pop()
        if name in reached and extras <= reached[name]:
            continue
        reached.setdefault(name, set()).update(extras)
        version, requires = dists[name]
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not any(
                    req.marker.evaluate({**env, "extra": e}) for e in sorted(extras) or [""]):
                continue
            dep = canon(req.name)
            if dep in have:
                continue
            if dep not in dists:
                unmet.append((req, f"{name} {version} needs {req} (no wheel)"))
            elif req.specifier and not req.specifier.contains(dists[dep][0], prereleases=True):
                unmet.append((req, f"{name} {version} needs {req}, the wheel is {dists[dep][0]}"))
            else:
                todo.append((dep, frozenset(req.extras)))
    return set(reached), unmet


def placeholder_wheel(folder: Path, name: str, version: str) -> Path:
    """An empty wheel that stands for a distribution the target has: no files, no requirements."""
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: twostage\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def parse_have(items: list[str]) -> dict[str, str]:
    """NAME[==VERSION] -> {canonical name: placeholder version}; without a version, the version
    installed here (or 9999): any requirement on it is then taken as met."""
    from importlib import metadata

    out = {}
    for item in items:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([0-9][0-9A-Za-z.!+]*))?\s*", item)
        if not m or m.group(2) and not re.fullmatch(VERSION_PATTERN, m.group(2), re.VERBOSE | re.IGNORECASE):
            raise Fail(f"--have {item!r}: expected NAME or NAME==VERSION")
        name, version = m.group(1), m.group(2)
        if version is None:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = "9999"
        out[canon(name)] = f"{Version(version).public}+{STUB_LOCAL}"
    return out


def build_twostage(source: Path, dest: Path, verbose: bool) -> Path:
    """twostage's wheel, built from a copy of the checkout (no build/ or egg-info left there)."""
    with tempfile.TemporaryDirectory(prefix="twostage-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pth", "pins.yaml", "trained.yaml")
        for name in SOURCE:
            if not (source / name).exists():
                raise Fail(f"{source}: not a twostage checkout (no {name})")
            if (source / name).is_dir():
                shutil.copytree(source / name, src / name, ignore=ignore)
            else:
                shutil.copy2(source / name, src / name)
        try:  # setuptools with bdist_wheel built in: no build isolation (nothing to download)
            import setuptools

            isolation = [] if Version(setuptools.__version__) < Version("70.1") else ["--no-build-isolation"]
        except ImportError:
            isolation = []
        pip(["wheel", "-q", "--no-deps", *isolation, "-w", str(dest), str(src)], "building twostage's wheel",
            verbose)
    wheels = sorted(dest.glob("twostage-*.whl"))
    if len(wheels) != 1:
        raise Fail(f"building twostage's wheel gave {[w.name for w in wheels]}")
    return wheels[0]


def build_basicsr(dest: Path, verbose: bool) -> None:
    """basicsr's wheel from its sdist: its setup.py imports torch, so no build isolation."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise Fail(f"building basicsr's wheel needs torch in this Python ({sys.executable}): its setup.py "
                   "imports torch; run this script with the twostage venv's python")
    pip(["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), BASICSR],
        f"building the wheel of {BASICSR} (from its sdist)", verbose)


def download(reqs: list[str], out: Path, links: list[Path], constraints: Path, target: list[str],
             verbose: bool) -> None:
    pip(["download", "--only-binary=:all:", "-d", str(out), "-c", str(constraints), *target,
         *[a for link in links for a in ("--find-links", str(link))], *reqs],
        "pip download", verbose)


def make_wheelhouse(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise Fail(f"{out}: exists and is not a folder")
    old = sorted(out.glob("*.whl")) if out.is_dir() else []
    if old and not args.overwrite:
        raise Fail(f"{out}: already holds {len(old)} wheels (pass --overwrite to replace them)")
    if args.python_version and not re.fullmatch(r"3\.\d+", args.python_version):
        raise Fail(f"--python-version {args.python_version!r}: expected MAJOR.MINOR, e.g. 3.12")
    have_items = ([] if args.with_torch else list(ON_TARGET)) + list(args.have or [])  # the user's versions win
    have = parse_have(have_items)
    target = []
    if args.python_version:
        target += ["--python-version", args.python_version]
    for plat in expand_platforms(args.platform or []):
        target += ["--platform", plat]
    env = target_environment(args.python_version, args.platform or [])
    print(f"target: Python {env['python_version']}, {', '.join(args.platform or ['this platform'])}; "
          f"on the target already (not carried): {', '.join(sorted(have)) or 'nothing'}", flush=True)

    for wheel in old:
        wheel.unlink()
    with tempfile.TemporaryDirectory(prefix="twostage-wheelhouse-") as tmp:
        built, stubs = Path(tmp) / "built", Path(tmp) / "placeholders"
        built.mkdir()
        stubs.mkdir()
        if "basicsr" not in have:
            print(f"building the wheel of {BASICSR}", flush=True)
            build_basicsr(built, args.verbose)
        print("building twostage's wheel from", args.source, flush=True)
        twostage = build_twostage(Path(args.source), built, args.verbose)
        placeholders = {placeholder_wheel(stubs, name, version).name for name, version in have.items()}
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in have.items()))
        print("downloading the other wheels (pip download --only-binary=:all:)", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        download([str(twostage)], out, [built, stubs], constraints, target, args.verbose)
        for rounds_left in (2, 1, 0):  # pip's markers were this Python's: the closure again, the target's
            for name in placeholders:
                (out / name).unlink(missing_ok=True)
            wheels = {}
            for path in sorted(out.glob("*.whl")):
                name, version, requires = wheel_metadata(path)
                if canon(name) in wheels:
                    raise Fail(f"{out}: two wheels of {name}: {wheels[canon(name)][0].name}, {path.name}")
                wheels[canon(name)] = (path, version, requires, name)
            needed, unmet = closure(["twostage"], {n: (w[1], w[2]) for n, w in wheels.items()}, env, set(have))
            missing = sorted({f"{req.name}{req.specifier}" for req, why in unmet if canon(req.name) not in wheels})
            if not unmet or not missing or not rounds_left:
                break
            print("the target also needs:", ", ".join(missing), flush=True)
            download(missing, out, [built, stubs], constraints, target, args.verbose)
        if unmet:
            raise Fail(f"the wheelhouse is incomplete for the target: {'; '.join(why for _, why in unmet)}")
        for name in sorted(set(wheels) - needed):
            print(f"dropped {wheels[name][0].name}: only this Python's markers ask for it", flush=True)
            wheels.pop(name)[0].unlink()

    rows = sorted(((w[3], w[1], w[0].stat().st_size, w[0].name) for w in wheels.values()), key=lambda r: r[0].lower())
    total = sum(r[2] for r in rows)
    lines = [f"twostage wheelhouse: Python {env['python_version']}, {', '.join(args.platform or [platform.machine()])}",
             f"not carried (the target has them): {', '.join(sorted(have)) or 'nothing'}",
             f"install there: pip install --no-index --find-links {out.name} twostage"]
    if {"opencv-python", "opencv-python-headless"} <= set(wheels):  # both write cv2/: the headless one last
        lines += [f"then: pip install --no-index --find-links {out.name} --force-reinstall --no-deps "
                  "opencv-python-headless"]
    lines += ["", f"{'name':40} {'version':24} {'KiB':>9}  file"]
    lines += [f"{n:40} {v:24} {s / 1024:9.0f}  {f}" for n, v, s, f in rows]
    lines += ["", f"total: {len(rows)} wheels, {total / 1e6:.1f} MB ({total / 2**20:.1f} MiB)"]
    (out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'MANIFEST.txt'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the wheelhouse folder to write")
    ap.add_argument("--python-version", help="the target's Python, MAJOR.MINOR (default: this Python's)")
    ap.add_argument("--platform", action="append",
                    help="a wheel platform tag the target accepts, e.g. manylinux_2_28_x86_64 (repeatable; "
                         "default: this machine's)")
    ap.add_argument("--have", action="append", metavar="NAME[==VERSION]",
                    help="a distribution the target already has: not carried (repeatable; torch and "
                         "torchvision always, unless --with-torch); give the target's version if known")
    torch = ap.add_mutually_exclusive_group()
    torch.add_argument("--no-torch", dest="with_torch", action="store_false",
                       help="torch and torchvision are on the target: not carried (the default)")
    torch.add_argument("--with-torch", action="store_true",
                       help="carry torch and torchvision too (PyPI's build: several GB of CUDA wheels)")
    ap.add_argument("--source", default=str(REPO), help="the twostage checkout (default: this one)")
    ap.add_argument("--overwrite", action="store_true", help="replace the wheels already in OUT")
    ap.add_argument("--verbose", action="store_true", help="show pip's commands and output")
    ap.set_defaults(with_torch=False)
    args = ap.parse_args(argv)
    try:
        return make_wheelhouse(args)
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
