"""What native code (libpng, OpenCV's logger, the ONNX exporter) writes straight to a file
descriptor, collected so it becomes the detail of one error instead of loose terminal lines."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

_LINE = re.compile(r"^(libpng (warning|error)|\[ ?(WARN|ERROR|INFO|DEBUG):)")
_LOCK = threading.RLock()  # re-entrant: one block may hold fd 1 and fd 2


@contextlib.contextmanager
def native_messages(collect: re.Pattern = _LINE, fd: int = 2) -> Iterator[list[str]]:
    """Collect the lines native code (libpng, OpenCV's logger; the ONNX exporter's graph dump,
    on fd 1) writes to file descriptor `fd` during the block, those matching `collect`.

    Their lines ("libpng error: IDAT: CRC error") become the detail of our one-line error
    instead of loose lines on the terminal; anything else written meanwhile (another
    thread's log line) is passed on afterwards. One block at a time (fd 2 is process-wide)."""
    messages: list[str] = []
    with _LOCK:
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
