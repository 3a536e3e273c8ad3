"""Super-resolution weight files: the manifest, hash checks, safe loading, explicit fetching.

A weight is a file under the weights folder listed in a manifest (name -> file, arch and
its parameters, scale, official URL, sha256). Nothing downloads implicitly: a missing or
mismatched file is a TwostageError naming the file, the expected hash and the URL.

The weights folder is `weights_dir` if given, else $TWOSTAGE_WEIGHTS, else `weights/` of the
source checkout the package is imported from (a checkout has `weights/manifest.yaml` beside
`twostage/`), else, for an installed package, the per-user cache folder
`$XDG_CACHE_HOME/twostage/weights` (default `~/.cache/twostage/weights`); never site-packages.
The manifest is `manifest` if given, else `<weights folder>/manifest.yaml` if it exists, else
the shipped one: the checkout's `weights/manifest.yaml`, or the copy installed inside the
package (`twostage/manifests/manifest.yaml`, mapped from `weights/` by pyproject.toml).

A manifest entry with `sha256: null` is "not pinned yet" (we could not verify the official
hash offline). Such a weight is refused unless the caller trusts it (`trust_unpinned`, the
CLI's --trust-unpinned) or the user pins the present file with `twostage weights --pin NAME`,
which records its sha256 in `<weights folder>/pins.yaml` (a local lock file).

Networks trained here (`twostage train-sr`, `twostage.sr.training`) are entries of
`<weights folder>/trained.yaml`, read as part of the manifest: same keys, always pinned, no
download URL, plus `trained_on` (the data, steps and held-out PSNR/SSIM). They live beside
their file rather than in the shipped manifest, which an installed package cannot write and
a checkout should not rewrite (docs/DESIGN.md §4).
"""
from __future__ import annotations

import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import TwostageError
from ..io.files import atomic_path, sha256_file, write_text_atomic
from ..io.readers import read_yaml

log = logging.getLogger(__name__)

ENV_WEIGHTS = "TWOSTAGE_WEIGHTS"
MANIFEST_NAME = "manifest.yaml"
PINS_NAME = "pins.yaml"
TRAINED_NAME = "trained.yaml"
PACKAGED_MANIFEST = "manifests"
"""Folder inside the installed package holding the manifest (pyproject maps it from weights/)."""
ARCHS = ("RRDBNet", "SRVGGNetCompact")


@dataclass(frozen=True)
class WeightSpec:
    """One manifest entry."""

    name: str
    file: str
    arch: str
    scale: int
    url: str | None
    sha256: str | None
    params: dict[str, Any] = field(default_factory=dict)
    trained_on: dict[str, Any] | None = None
    """Set for networks `twostage train-sr` made (entries of trained.yaml): what they learnt from."""


def repo_weights_dir() -> Path:
    """`weights/` beside the imported `twostage/` package (the checkout's; may not exist when installed)."""
    import twostage

    return Path(twostage.__file__).resolve().parents[1] / "weights"


def in_checkout() -> bool:
    """Whether the package is imported from a source checkout (`weights/manifest.yaml` beside `twostage/`)."""
    return (repo_weights_dir() / MANIFEST_NAME).is_file()


def user_weights_dir() -> Path:
    """The per-user weights folder of an installed package: $XDG_CACHE_HOME/twostage/weights
    (an absolute $XDG_CACHE_HOME only, as the XDG spec says), else ~/.cache/twostage/weights."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return base / "twostage" / "weights"


def weights_dir(path: str | os.PathLike | None = None) -> Path:
    """The weights folder: `path`, else $TWOSTAGE_WEIGHTS, else the checkout's weights/, else the user cache."""
    if path is not None:
        return Path(path)
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        return Path(env)
    return repo_weights_dir() if in_checkout() else user_weights_dir()


def shipped_manifest() -> Path:
    """The manifest that comes with the code: the checkout's weights/manifest.yaml, else the package's copy."""
    if in_checkout():
        return repo_weights_dir() / MANIFEST_NAME
    return Path(str(resources.files("twostage") / PACKAGED_MANIFEST / MANIFEST_NAME))


def manifest_path(directory: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None) -> Path:
    """The manifest file: `manifest`, else <weights folder>/manifest.yaml if present, else the shipped one."""
    if manifest is not None:
        return Path(manifest)
    local = weights_dir(directory) / MANIFEST_NAME
    return local if local.is_file() else shipped_manifest()


_KEYS = {"file", "arch", "scale", "url", "sha256", "params"}


def _parse_entry(path: Path, name: object, e: object, trained: bool) -> WeightSpec:
    """One validated entry of a manifest (or of trained.yaml, which adds `trained_on` and has no URL)."""
    if not isinstance(e, dict):
        raise TwostageError(f"{path}: weights.{name}: expected a mapping")
    required, allowed = {"file", "arch", "scale"} | ({"sha256"} if trained else {"url"}), \
        _KEYS | ({"trained_on"} if trained else set())
    missing, unknown = required - set(e), set(e) - allowed
    if missing or unknown:
        raise TwostageError(f"{path}: weights.{name}: missing {sorted(missing)} / unknown {sorted(unknown)} keys")
    if e["arch"] not in ARCHS:
        raise TwostageError(f"{path}: weights.{name}: arch {e['arch']!r} not one of {', '.join(ARCHS)}")
    sha = e.get("sha256")
    if (sha is not None or trained) and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
        raise TwostageError(f"{path}: weights.{name}: sha256 must be 64 hex digits{'' if trained else ' or null'}")
    scale, params = e["scale"], e.get("params") or {}
    if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= 16:
        raise TwostageError(f"{path}: weights.{name}: scale {scale!r} must be a whole number from 1 to 16")
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise TwostageError(f"{path}: weights.{name}: params must be a mapping of argument names")
    if not isinstance(e["file"], str) or Path(e["file"]).name != e["file"] or e["file"] in ("", ".", ".."):
        raise TwostageError(f"{path}: weights.{name}: file {e['file']!r} must be a file name in the weights folder")
    trained_on = e.get("trained_on")
    if trained and not isinstance(trained_on, dict):
        raise TwostageError(f"{path}: weights.{name}: trained_on must be a mapping")
    url = e.get("url")
    return WeightSpec(str(name), e["file"], e["arch"], scale, None if url is None else str(url),
                      sha.lower() if sha else None, dict(params), trained_on)


def _read_entries(path: Path, what: str, trained: bool) -> dict[str, WeightSpec]:
    obj = read_yaml(path, what)
    if not isinstance(obj, dict) or not isinstance(obj.get("weights"), dict):
        raise TwostageError(f"{path}: expected a top-level 'weights' mapping")
    return {str(name): _parse_entry(path, name, e, trained) for name, e in obj["weights"].items()}


def load_manifest(path: str | os.PathLike) -> dict[str, WeightSpec]:
    """Parse and validate a manifest YAML (`weights: {name: {file, arch, scale, url, sha256, params}}`)."""
    return _read_entries(Path(path), "weights manifest", trained=False)


def load_trained(directory: str | os.PathLike) -> dict[str, WeightSpec]:
    """The networks trained into a weights folder (its trained.yaml; none if absent)."""
    path = Path(directory) / TRAINED_NAME
    return _read_entries(path, "trained weights list", trained=True) if path.is_file() else {}


def all_specs(weights_dir_: str | os.PathLike | None = None,
              manifest: str | os.PathLike | None = None) -> tuple[dict[str, WeightSpec], Path]:
    """Every weight a name can refer to: the manifest's entries and the weights folder's
    trained ones; returns (specs, manifest path). A trained name that shadows a manifest name
    is an error rather than a silent choice."""
    mpath = manifest_path(weights_dir_, manifest)
    specs = load_manifest(mpath)
    trained = load_trained(weights_dir(weights_dir_))
    clash = sorted(set(specs) & set(trained))
    if clash:
        raise TwostageError(f"{weights_dir(weights_dir_) / TRAINED_NAME}: {', '.join(clash)} also named in the manifest "
                            f"{mpath}; rename the trained network (twostage train-sr --out OTHER)")
    return {**specs, **trained}, mpath


def register_trained(spec: WeightSpec, weights_dir_: str | os.PathLike | None = None) -> Path:
    """Add or replace `spec` (a file already in the weights folder, its sha256 set) in trained.yaml."""
    import yaml

    directory = weights_dir(weights_dir_)
    if spec.sha256 is None or spec.trained_on is None:
        raise ValueError("register_trained: a trained entry needs its sha256 and trained_on")
    entries = {name: {k: v for k, v in vars(s).items() if k != "name"} for name, s in load_trained(directory).items()}
    entries[spec.name] = {k: v for k, v in vars(spec).items() if k != "name"}
    path = directory / TRAINED_NAME
    write_text_atomic(path, "# Networks trained into this weights folder by `twostage train-sr` (read with the "
                            "manifest).\n" + yaml.safe_dump({"weights": entries}, sort_keys=False))
    return path


def _pins(directory: Path) -> dict[str, str]:
    p = directory / PINS_NAME
    if not p.is_file():
        return {}
    obj = read_yaml(p, "weight pins") or {}
    if not isinstance(obj, dict):
        raise TwostageError(f"{p}: expected a mapping name -> sha256")
    return {str(k): str(v).lower() for k, v in obj.items()}


def _spec(name: str, specs: dict[str, WeightSpec], source: Path) -> WeightSpec:
    if name not in specs:
        raise TwostageError(f"{name}: not in the weights manifest {source}; known: {', '.join(specs) or 'none'}")
    return specs[name]


def _where(spec: WeightSpec) -> str:
    """How to get the file of `spec` (downloaded, or copied from where it was trained)."""
    if spec.url is None:
        on = (spec.trained_on or {}).get("data", "?")
        return f"it was trained by `twostage train-sr` on {on}: copy {spec.file} from there, or train it again"
    return f"download it with `twostage weights --fetch {spec.name}` or from {spec.url}"


def expected_sha256(spec: WeightSpec, directory: Path) -> str | None:
    """The manifest hash, else the local pin, else None (unpinned)."""
    return spec.sha256 or _pins(directory).get(spec.name)


def resolve(name: str, weights_dir_: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None,
            trust_unpinned: bool = False) -> tuple[WeightSpec, Path, str]:
    """Find and verify a weight file: (spec, path, sha256 of the file).

    Missing file, hash mismatch, or an unpinned hash (unless `trust_unpinned`) is a
    TwostageError naming the file, the expected hash and the URL.
    """
    directory = weights_dir(weights_dir_)
    specs, mpath = all_specs(weights_dir_, manifest)
    spec = _spec(name, specs, mpath)
    path = directory / spec.file
    expected = expected_sha256(spec, directory)
    if not path.is_file():
        raise TwostageError(f"{path}: weight file for {name} is missing (expected sha256 "
                            f"{expected or 'not pinned'}); {_where(spec)} into {directory}")
    actual = sha256_file(path)
    if expected is None:
        if not trust_unpinned:
            raise TwostageError(f"{path}: sha256 {actual} of {name} is not pinned in {mpath}; check it came "
                                f"from {spec.url}, then run `twostage weights --pin {name}` (or pass --trust-unpinned)")
        log.warning("%s: using unpinned weight file (sha256 %s)", path, actual)
    elif actual != expected:
        raise TwostageError(f"{path}: sha256 {actual} does not match the expected {expected} for {name} "
                            f"(corrupt or wrong file); {_where(spec)}")
    return spec, path, actual


def load_state_dict(path: str | os.PathLike) -> dict:
    """Tensors of a weight file via torch.load(weights_only=True): 'params_ema', else 'params', else the raw dict."""
    import torch

    from ..checkpoint import load_weights_only

    obj = load_weights_only(path, "weights file")
    state = next((obj[k] for k in ("params_ema", "params") if k in obj), obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise TwostageError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def build_model(spec: WeightSpec):
    """The (untrained) basicsr network a manifest entry describes."""
    from .compat import import_basicsr

    RRDBNet, SRVGGNetCompact = import_basicsr()
    cls = {"RRDBNet": RRDBNet, "SRVGGNetCompact": SRVGGNetCompact}[spec.arch]
    try:
        return cls(**spec.params)
    except (TypeError, ValueError, RuntimeError, MemoryError) as e:  # wrong names, values, or sizes beyond memory
        raise TwostageError(f"weights {spec.name}: bad params for {spec.arch}: {e}") from None


def load_model(name: str, weights_dir_: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None,
               trust_unpinned: bool = False):
    """(model in eval mode on CPU, spec, sha256): a verified weight file loaded into its architecture."""
    spec, path, sha = resolve(name, weights_dir_, manifest, trust_unpinned)
    model = build_model(spec)
    try:
        model.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as e:
        raise TwostageError(f"{path}: weights do not fit {spec.arch}{spec.params}: {str(e).splitlines()[0]}") from None
    return model.eval(), spec, sha


def status(weights_dir_: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None) -> list[dict]:
    """One row per manifest entry: name, file, state (ok / missing / bad / unpinned), sha256, url."""
    directory = weights_dir(weights_dir_)
    specs, mpath = all_specs(weights_dir_, manifest)
    log.info("weights folder: %s (manifest %s)", directory, mpath)
    rows = []
    for spec in specs.values():
        path = directory / spec.file
        expected = expected_sha256(spec, directory)
        actual = sha256_file(path) if path.is_file() else None
        if actual is None:
            state = "missing"
        elif expected is None:
            state = "unpinned"
        else:
            state = "ok" if actual == expected else "bad"
        rows.append({"name": spec.name, "file": str(path), "state": state, "sha256": actual,
                     "expected": expected, "url": spec.url, "trained_on": spec.trained_on})
    return rows


def pin(name: str, weights_dir_: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None) -> str:
    """Record the sha256 of the present file of `name` in <weights folder>/pins.yaml; returns it."""
    import yaml

    directory = weights_dir(weights_dir_)
    spec = _spec(name, *all_specs(weights_dir_, manifest))
    path = directory / spec.file
    if not path.is_file():
        raise TwostageError(f"{path}: weight file for {name} is missing; nothing to pin (get it from {spec.url})")
    sha = sha256_file(path)
    if spec.sha256 is not None and sha != spec.sha256:
        raise TwostageError(f"{path}: sha256 {sha} differs from the manifest's {spec.sha256}; refusing to pin")
    pins = _pins(directory)
    pins[name] = sha
    write_text_atomic(directory / PINS_NAME,
                      "# Local sha256 pins for weights the manifest has not pinned (twostage weights --pin).\n"
                      + yaml.safe_dump(pins, sort_keys=True))
    return sha


def fetch(name: str, weights_dir_: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None,
          timeout: float = 60.0, overwrite: bool = False) -> tuple[Path, str]:
    """Download a weight from its manifest URL (explicit user action only): temp file, hash check, atomic rename.

    A pinned hash must match or nothing is written. An unpinned download is kept and its hash
    returned so the user can check and `--pin` it. Returns (path, sha256).
    """
    import hashlib

    from tqdm import tqdm

    directory = weights_dir(weights_dir_)
    spec = _spec(name, *all_specs(weights_dir_, manifest))
    path = directory / spec.file
    expected = expected_sha256(spec, directory)
    if spec.url is None:
        raise TwostageError(f"{name}: nothing to download; {_where(spec)}")
    if path.is_file() and not overwrite:
        sha = sha256_file(path)
        if expected is None or sha == expected:
            log.info("%s: already present (sha256 %s)", path, sha)
            return path, sha
        raise TwostageError(f"{path}: present but sha256 {sha} != expected {expected}; delete it or pass --overwrite")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TwostageError(f"{directory}: cannot create the weights folder ({e.strerror or e})") from None
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as resp, atomic_path(path) as tmp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=spec.file, disable=None) as bar:
                while block := resp.read(1 << 20):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
            sha = h.hexdigest()
            if expected is not None and sha != expected:
                raise TwostageError(f"{spec.url}: downloaded sha256 {sha} != expected {expected} for {name}; "
                                    f"nothing written")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise TwostageError(f"{spec.url}: download of {name} failed ({reason}); are you offline? "
                            f"Download it by hand into {path}") from None
    if expected is None:
        log.warning("%s: downloaded, sha256 %s is not pinned; check it and run `twostage weights --pin %s`",
                    path, sha, name)
    return path, sha
