"""Bounded reading of PNG images: the header's size against the pixel limit (`max_pixels()`)
and every chunk's length against the file are checked before OpenCV decodes anything, so
memory is bounded by the file's size plus the decoded pixels; anything else is one
TwostageError naming the file."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import TwostageError
from .native import native_messages

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENV_MAX_PIXELS = "TWOSTAGE_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest image (width × height) decoded by default: 16 radiographs of 2048²."""
OPENCV_MAX_PIXELS = 1 << 30
"""OpenCV refuses to decode more pixels than this (CV_IO_MAX_IMAGE_PIXELS)."""
PNG_MAX_SIDE = (1 << 31) - 1
"""The PNG format's largest width or height."""


def max_pixels() -> int:
    """The pixel limit of every image reader: $TWOSTAGE_MAX_PIXELS, else DEFAULT_MAX_PIXELS,
    capped at OPENCV_MAX_PIXELS. A decoded image holds at most 8 bytes per pixel (16-bit RGBA)."""
    raw = os.environ.get(ENV_MAX_PIXELS, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise TwostageError(f"${ENV_MAX_PIXELS}={raw!r}: expected a positive whole number of pixels")
    return min(value, OPENCV_MAX_PIXELS)


def png_header_size(head: bytes, path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) declared by the IHDR chunk at the start of a PNG's bytes (at least the first 24),
    checked against the format and `max_pixels()` before anything is decoded: the one size
    check of every image reader."""
    if not head:
        raise TwostageError(f"{path}: empty file, not a PNG")
    if head[:8] != PNG_SIGNATURE:
        raise TwostageError(f"{path}: not a PNG file (bad signature)")
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise TwostageError(f"{path}: not a PNG file (bad header)")
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not (1 <= w <= PNG_MAX_SIDE and 1 <= h <= PNG_MAX_SIDE):
        raise TwostageError(f"{path}: not a valid PNG (its header declares a {w}x{h} image)")
    limit = max_pixels()
    if w * h > limit:
        raise TwostageError(f"{path}: the PNG header declares a {w}x{h} image ({w * h} pixels), over the limit "
                            f"of {limit} pixels (set ${ENV_MAX_PIXELS} to read larger images)")
    return h, w


def _check_chunks(data: bytes | memoryview, path: str | os.PathLike) -> None:
    """Every chunk up to IEND lies inside the file. OpenCV allocates what a chunk declares
    before reading it: a 68-byte PNG declaring a 4 GiB IDAT made it take 4 GiB and 3.5 s."""
    pos, size = 8, len(data)
    while pos + 8 <= size:
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), bytes(data[pos + 4:pos + 8])
        if length > PNG_MAX_SIDE or pos + 12 + length > size:
            raise TwostageError(f"{path}: not a readable image (corrupt or truncated PNG: chunk {kind!r} at byte "
                                f"{pos} declares {length} bytes, the file has {max(size - pos - 12, 0)} left)")
        if kind == b"IEND":
            return
        pos += 12 + length


def _detail(messages: list[str]) -> str:
    """'IDAT: CRC error' from collected native lines (the errors, else the warnings)."""
    texts = [re.sub(r"^(libpng (warning|error):|\[[^\]]*\]\s*(global\s+\S+\s+\S+\s+)?)", "", m).strip()
             for m in messages]
    errors = [t for t, m in zip(texts, messages) if "error" in m.split(":", 1)[0].lower()]
    return "; ".join(dict.fromkeys(errors or texts))


def read_image_raw(path: str | os.PathLike) -> np.ndarray:
    """Decode a PNG exactly as stored ((H, W) or (H, W, C), uint8 or uint16), for checks
    that need the channel count and bit depth. The header's size and the chunk lengths are
    checked first (`png_header_size`, `_check_chunks`); empty, corrupt or oversized files are
    TwostageErrors naming the file."""
    import cv2

    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise TwostageError(f"{path}: cannot read image ({e.strerror or e})") from None
    except MemoryError:
        raise TwostageError(f"{path}: file too large to read into memory") from None
    h, w = png_header_size(data[:24].tobytes(), path)
    _check_chunks(memoryview(data), path)
    with native_messages() as messages:
        try:
            img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        except cv2.error as e:  # OpenCV's own limits; ours are checked above
            img, messages[:] = None, [str(e).strip().splitlines()[-1]]
    if img is None:
        why = _detail(messages)
        raise TwostageError(f"{path}: not a readable image (corrupt or truncated PNG{': ' + why if why else '?'})")
    if img.shape[:2] != (h, w):
        raise TwostageError(f"{path}: decoded size {img.shape[1]}x{img.shape[0]} differs from its header's {w}x{h}")
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
    """(H, W) of a PNG from its IHDR header, without decoding the pixels (cheap cache keys),
    within the pixel limit (`png_header_size`)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise TwostageError(f"{path}: cannot read image ({e.strerror or e})") from None
    return png_header_size(head, path)
