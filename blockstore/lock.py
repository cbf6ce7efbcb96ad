"""The one-writer-per-store rule: an advisory flock on STORE/LOCK that records the holder's pid."""

from __future__ import annotations

import fcntl
import os
import stat

from blockstore.errors import StoreLocked, error_for_os

LOCK_FILE = "LOCK"


class WriterLock:
    """Held for the writer's lifetime. flock is per open file, so a second open in the same process
    is refused too (two writers in one process would corrupt each other's counters just as well)."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self, root: str) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # a directory or a dangling link where LOCK belongs, a read-only file system
            hint = ""
            if os.path.lexists(self.path) and not os.path.isfile(self.path):
                what = "a dangling link" if os.path.islink(self.path) else "not a file"
                hint = (f" ({LOCK_FILE} is {what}; it holds no data: move it away and open again, the writer "
                        "creates it)")
            raise error_for_os(exc, f"cannot take the writer lock {self.path!r}{hint}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:  # the holder's pid words the message; a LOCK that cannot be read back (a FIFO: ESPIPE) has none
                pid = int(os.pread(fd, 32, 0).decode().strip() or 0) or None
            except (ValueError, OSError):
                pid = None
            os.close(fd)
            raise StoreLocked(root, pid) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid only words StoreLocked's message (held_by reads /proc/locks); a full disk must not stop an open
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def held_by(root: str) -> int | None:
    """The pid of the process holding the store's writer lock (0 when its pid cannot be seen), or None
    when no writer holds it. Never takes the lock itself: even a brief test-lock would make a writer
    that starts at that moment fail with StoreLocked. On Linux /proc/locks names every flock holder by
    the locked file's device and inode; elsewhere the pid the holder wrote into the file is trusted if
    that process is alive (a crashed writer's pid, reused since, makes this say "held": the cautious way)."""
    path = os.path.join(root, LOCK_FILE)
    try:
        st = os.stat(path)
    except OSError:
        return None
    recorded = 0
    if stat.S_ISREG(st.st_mode):  # a FIFO: open() would wait for a writer forever
        try:
            with open(path, "rb") as f:
                text = f.read(32).decode(errors="replace").strip()
            recorded = int(text) if text.isdigit() else 0
        except OSError:
            pass
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        if not recorded:
            return None
        try:
            os.kill(recorded, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return recorded
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 6262 fe:00:2228314 0 EOF"; a blocked waiter's line has "->" after "1:"
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            major, minor, ino = parts[5].split(":")
            where = (int(major, 16), int(minor, 16), int(ino))
            pid = int(parts[4])
        except ValueError:
            continue
        if where == want:
            return pid or recorded
    return None
