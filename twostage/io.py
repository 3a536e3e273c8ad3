"""File primitives shared by every command: atomic writes, image reading, hashing.

Outputs are never visible half-written: everything is written to a temporary file in the
same folder and renamed into place.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import TwostageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def write_png_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise TwostageError(f"{path}: could not encode PNG")
    write_bytes_atomic(path, buf.tobytes())


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Parse a YAML file with `yaml.safe_load`; unreadable or invalid files are one-line errors naming it."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TwostageError(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        raise TwostageError(f"{path}: invalid YAML in {what} ({str(e).splitlines()[0]})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_image_raw(path: str | os.PathLike) -> np.ndarray:
    """Decode a PNG exactly as stored ((H, W) or (H, W, C), uint8 or uint16), for checks
    that need the channel count and bit depth; TwostageError for empty/corrupt files."""
    import cv2

    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise TwostageError(f"{path}: cannot read image ({e.strerror or e})") from None
    if data.size == 0:
        raise TwostageError(f"{path}: empty file, not a PNG")
    if data[:8].tobytes() != PNG_SIGNATURE:  # also keeps OpenCV's own decoder errors off stderr
        raise TwostageError(f"{path}: not a PNG file (bad signature)")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise TwostageError(f"{path}: not a readable image (corrupt or truncated PNG?)")
    return img


def to_gray8(img: np.ndarray, path: str | os.PathLike = "<image>") -> np.ndarray:
    """(H, W) uint8 from a raw decoded image: first channel (alpha ignored), 16-bit scaled by dtype."""
    if img.ndim == 3:
        img = img[:, :, 0]
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise TwostageError(f"{path}: unsupported pixel type {img.dtype} (expected 8- or 16-bit)")
    return np.ascontiguousarray(img)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an X-ray PNG as an (H, W) uint8 array.

    1- or 3-channel (identical channels) and alpha are accepted; 16-bit images are scaled to
    8 bits from their dtype (never guessed from pixel values, so a dark 16-bit image stays dark).
    """
    return to_gray8(read_image_raw(path), path)


def png_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of a PNG from its IHDR header, without decoding the pixels (cheap cache keys)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise TwostageError(f"{path}: cannot read image ({e.strerror or e})") from None
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise TwostageError(f"{path}: not a PNG file (bad header)")
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return h, w
