"""Run locks: one flock per output, so two runs never write the same file at once and a killed
run's leftover lock file blocks nothing."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from ..errors import TwostageError
from .files import make_dir, write_error

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None


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
