"""One writer per corpus folder: an advisory ``flock`` on ``DIR/.lock``.

``flock`` locks belong to the open file and vanish when the process dies (even by SIGKILL),
so a lock left behind by a crashed run never blocks the next one; the file itself stays
and is harmless.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

from handsoff.errors import HandsoffError

__all__ = ["LOCK_NAME", "corpus_lock"]

LOCK_NAME = ".lock"


@contextlib.contextmanager
def corpus_lock(folder: Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    Raises:
        HandsoffError: another process holds it, or the folder cannot be written.
    """
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise HandsoffError(f"{folder}: cannot write here ({os.strerror(err.errno or errno.EIO)})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise HandsoffError(f"{folder}: another run is writing this corpus ({holder} holds {path}); "
                                f"wait for it or choose another --out") from None
        # Who holds it, for the message above; best effort (a read-only file still locks).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # also releases the lock
