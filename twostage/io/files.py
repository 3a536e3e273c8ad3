"""Atomic writes, so outputs are never visible half-written: a file is written to a temporary
file in the same folder and renamed into place, a folder written whole is staged under a
temporary name beside it; a write that fails (full disk, read-only folder) leaves nothing under
the final name and is one TwostageError. Also the content hash that names a file's version."""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import TwostageError

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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
