"""File primitives shared by every command: atomic writes, run locks, bounded reading of
images, JSON and YAML, hashing.

Outputs are never visible half-written: everything is written to a temporary file in the
same folder and renamed into place; a write that fails (full disk, read-only folder) leaves
no file under the final name and is one TwostageError. Readers turn anything a file can
hold into a result or one TwostageError naming the file, with memory bounded by the file's
size plus, for images, the decoded pixels (at most `max_pixels()`).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import TwostageError

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

# --------------------------------------------------------------------------- writing

_WRITE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.EFBIG, errno.EIO}
"""OSErrors of a failed write: full disk or quota, read-only or forbidden folder, file too large."""


def write_error(path: str | os.PathLike, e: OSError) -> TwostageError:
    """The one-line error of a failed write of `path`."""
    return TwostageError(f"{path}: cannot write ({e.strerror or e}); nothing was written under this name")


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process's umask, read once (by setting and restoring it: not while threads write)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A write error of the temporary file (full disk, read-only folder, ...) is a TwostageError
    naming `path`; the temporary file is removed and an existing `path` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename: a plain file's mode
    except OSError as e:
        raise write_error(path, e) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:
        # only errors of this write (no file named, or the temporary one); others are not ours to rename
        if e.errno not in _WRITE_ERRNOS or e.filename not in (None, tmp, str(path)):
            raise
        raise write_error(path, e) from None
    finally:
        with contextlib.suppress(OSError):
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


def make_dir(path: str | os.PathLike) -> Path:
    """Create an output folder (and its parents); failure is one TwostageError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TwostageError(f"{path}: cannot create the folder ({e.strerror or e})") from None
    return path


def check_new_dir(out: str | os.PathLike) -> None:
    """`out` must be absent or an empty folder: a command that fills a folder never mixes its
    files into existing ones."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TwostageError(f"{out}: exists and is not a folder; --out takes a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise TwostageError(f"{out}: folder is not empty; --out takes a new or empty folder")


@contextlib.contextmanager
def staging_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed onto it (absent or empty, `check_new_dir`) when
    the block succeeds, else removed: the folder appears complete or not at all."""
    out = Path(out)
    make_dir(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # a plain folder's mode, not mkdtemp's 0700
    except OSError as e:
        raise write_error(out, e) from None
    try:
        yield tmp
        check_new_dir(out)
        try:
            os.replace(tmp, out)  # onto an empty folder too
        except OSError as e:
            raise write_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- run locks

def _lock_file(target: Path, tag: str) -> Path:
    """`.<name>.lock` beside `target`, `.<name>.lock.<tag>` for one of several locks of it."""
    return target.parent / (f".{target.name}.lock" + (f".{tag}" if tag else ""))


def lock_holder(lock: str | os.PathLike) -> dict | None:
    """Who holds a `run_lock` file ({command, pid, host, started, ...}), or None when no live
    process does (a leftover file of a killed run is no lock)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    for _ in range(50):  # the holder writes who it is just after locking
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(Path(lock).read_text(encoding="utf-8"))
            if isinstance(info, dict):
                return info
        time.sleep(0.02)
    return {}


def describe_holder(info: dict) -> str:
    """`command` (pid N on HOST, started T) of a `lock_holder` record."""
    return (f"`{info.get('command', 'twostage')}` (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"started {info.get('started', '?')})")


@contextlib.contextmanager
def run_lock(target: str | os.PathLike, command: str, tag: str = "", info: dict | None = None) -> Iterator[Path]:
    """Hold the lock file `.<name>.lock[.<tag>]` beside `target` while `command` writes it.

    A second run asking for the same lock is refused with one error naming the first run's
    pid, instead of both writing at once. The lock is an flock, so the kernel releases it
    when its process ends: the file a killed run leaves behind blocks nothing. The file says
    who holds it (`info` added: what other runs may compare) and is removed on exit. Yields
    the lock file. Without `fcntl` (Windows) no lock is taken."""
    target = Path(target)
    lock = _lock_file(target, tag)
    if fcntl is None:
        yield lock
        return
    make_dir(lock.parent)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(target, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(lock)
            raise TwostageError(f"{target}: {describe_holder(holder or {})} is writing it; wait for that run to "
                                f"end or write elsewhere (lock file {lock})") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the previous holder removed this file as we locked it: lock the new one
    record = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), **(info or {})}
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(record) + "\n").encode())
        except OSError as e:  # a full disk: nothing can be written there anyway
            raise write_error(target, e) from None
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def other_holders(target: str | os.PathLike, own: Path) -> list[dict]:
    """The `lock_holder` records of every other run holding a lock of `target` (any tag)."""
    import glob

    target = Path(target)
    locks = sorted(target.parent.glob(f".{glob.escape(target.name)}.lock*"))
    return [h for h in (lock_holder(p) for p in locks if p != own) if h is not None]


# --------------------------------------------------------------------------- JSON and YAML

MAX_TREE_VALUES = 1_000_000
"""A YAML file may expand to at most this many values: aliases let a file of a few hundred
bytes stand for billions of them ("billion laughs"); JSON cannot, its size bounds it."""


def _parse_error(path: str | os.PathLike, language: str, what: str, e: Exception) -> TwostageError:
    if isinstance(e, RecursionError):
        return TwostageError(f"{path}: {language} of {what} nested too deeply")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return TwostageError(f"{path}: invalid {language} in {what} ({first})")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise TwostageError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise TwostageError(f"{path}: invalid {what} (not UTF-8 text: {e.reason} at byte {e.start})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; unreadable, invalid or too deeply nested files are one-line errors naming it.
    (NaN and Infinity are accepted as Python reads them; callers check their numbers.)"""
    path = Path(path)
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and Python's int digit limit
        raise _parse_error(path, "JSON", what, e) from None


def _check_tree_size(obj: Any, path: str | os.PathLike, what: str) -> None:
    """Count the values `obj` expands to (without recursion: a deep tree is no problem here),
    stopping at MAX_TREE_VALUES."""
    stack, count = [obj], 0
    while stack:
        v = stack.pop()
        count += 1
        if count > MAX_TREE_VALUES:
            raise TwostageError(f"{path}: {what} expands to more than {MAX_TREE_VALUES} values "
                                "(YAML aliases repeating one another?)")
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set)):
            stack.extend(v)


def parse_yaml(text: str, where: str | os.PathLike, what: str = "YAML") -> Any:
    """`yaml.safe_load(text)`; anything it cannot turn into values (also dates that do not
    exist, numbers of too many digits, nesting too deep, aliases expanding beyond
    MAX_TREE_VALUES) is one TwostageError naming `where` (the file, or the flag)."""
    import yaml

    try:
        obj = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - besides YAMLError, the constructors raise ValueError,
        # IndexError, OverflowError (`a: !!int`, `a: 2001-02-30`, `a: !!int 08`) and deep nesting RecursionError
        raise _parse_error(where, "YAML", what, e) from None
    _check_tree_size(obj, where, what)
    return obj


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Parse a YAML file (`parse_yaml`); unreadable or invalid files are one-line errors naming it."""
    path = Path(path)
    return parse_yaml(_read_text(path, what), path, what)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- images

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


_NATIVE_LINE = re.compile(r"^(libpng (warning|error)|\[ ?(WARN|ERROR|INFO|DEBUG):)")
_NATIVE_LOCK = threading.RLock()  # re-entrant: one block may hold fd 1 and fd 2


@contextlib.contextmanager
def native_messages(collect: re.Pattern = _NATIVE_LINE, fd: int = 2) -> Iterator[list[str]]:
    """Collect the lines native code (libpng, OpenCV's logger; the ONNX exporter's graph dump,
    on fd 1) writes to file descriptor `fd` during the block, those matching `collect`.

    Their lines ("libpng error: IDAT: CRC error") become the detail of our one-line error
    instead of loose lines on the terminal; anything else written meanwhile (another
    thread's log line) is passed on afterwards. One block at a time (fd 2 is process-wide)."""
    messages: list[str] = []
    with _NATIVE_LOCK:
        try:
            (sys.stdout if fd == 1 else sys.stderr).flush()
            saved = os.dup(fd)
        except (OSError, AttributeError, ValueError):  # no usable fd 2: nothing to collect
            saved = None
        if saved is None:
            yield messages
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), fd)
            try:
                yield messages
            finally:
                os.dup2(saved, fd)
                os.close(saved)
                sink.seek(0)
                other = []
                for line in sink.read().decode("utf-8", "replace").splitlines(keepends=True):
                    (messages if collect.match(line) else other).append(line)
                if other:
                    os.write(fd, "".join(other).encode())


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
