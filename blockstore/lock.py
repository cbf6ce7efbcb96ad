"""The one-writer-per-store rule: an advisory flock on STORE/LOCK that records the holder's pid."""

from __future__ import annotations

import fcntl
import os

from blockstore.errors import StoreLocked

LOCK_FILE = "LOCK"


class WriterLock:
    """Held for the writer's lifetime. flock is per open file, so a second open in the same process
    is refused too (two writers in one process would corrupt each other's counters just as well)."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self, root: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.pread(fd, 32, 0).decode().strip() or 0) or None
            except ValueError:
                pid = None
            os.close(fd)
            raise StoreLocked(root, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None
