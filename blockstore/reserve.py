"""STORE/RESERVE: disk space a writable store holds back, so that a disk the store itself filled is not a
dead end. Deleting needs room (a tombstone, the directory's WAL), and so do close, the next open (RocksDB
recovers its WAL into a table) and compaction (GC copies a block's live records before the block goes):
without room held back, a store alone on its disk could never free a byte through its own API, only by files
removed elsewhere (tests/test_review_session26.py).

The reserve is a file of `size` bytes, allocated (posix_fallocate, so the blocks really are taken) by the
first write of a session that adds data when the disk has room for it twice over. The first
NoSpace of a user write gives it up (truncated to 0 bytes, so the file says so across a reopen), and from then
on writes that add data are refused with NoSpace while deletes, close, reopen and compaction use the room;
once the disk has room for the reserve twice over (deletes and GC freed it, or files went elsewhere), the
next write takes the reserve back and goes on. Without the file (an old store, or a disk too full when it
was opened) nothing is refused: the store behaves as it did before there was a reserve."""

from __future__ import annotations

import errno
import os

from blockstore import logs
from blockstore.errors import NoSpace

RESERVE = "RESERVE"
_MIN_RESERVE = 64 << 10  # smaller than this holds back too little to be worth a file
_HEADROOM = 4 << 20  # the directory's share: a WAL recovered into a table, a new MANIFEST and WAL

_log = logs.get("blocks")


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def reserve_size(root: str, block_size: int) -> int:
    """One block (what GC may copy before it frees one) plus the directory's headroom, but never more than a
    sixteenth of the file system; 0 (no reserve) when that is too small to matter."""
    st = os.statvfs(root)
    size = min(block_size + _HEADROOM, st.f_blocks * st.f_frsize // 16)
    return size if size >= _MIN_RESERVE else 0


class SpaceReserve:
    """The reserve of one writable store. `pending` says whether the next write that adds data must call
    `admit` (the reserve is not made yet this session, or it is given up); `admit` and `give_up` are idempotent,
    and a race between two writers at worst refuses one more put or takes the reserve back one write late."""

    def __init__(self, root: str, block_size: int) -> None:
        self.root = root
        self.path = os.path.join(root, RESERVE)
        try:
            self.size = reserve_size(root, block_size)
        except OSError:
            self.size = 0
        self.given_up = False
        self.pending = False

    def before_open(self) -> None:
        """Before the directory is opened: on a disk with less free than the reserve, give it up now (the
        open needs room to recover the directory's WAL); a reserve given up earlier stays given up."""
        if not self.size:
            return
        self.pending = True  # made, if there is none, by the first write that adds data (an empty store holds none)
        try:
            held = os.path.getsize(self.path)
        except OSError:
            return
        self.given_up = held < self.size
        if not self.given_up and free_bytes(self.root) < self.size:
            self.give_up("the disk has less free space than the reserve at open")

    def give_up(self, why: str) -> None:
        """Free the reserve (truncate, so the file says it was given up) for deletes, close and compaction."""
        if self.given_up or not self.size:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        except OSError:
            return
        finally:
            os.close(fd)
        self.given_up = self.pending = True
        _log.warning("%s: gave up its %d-byte space reserve (%s): writes that add data are refused until the "
                     "disk has room for it again; deletes, close and compaction go on", self.root, self.size, why)

    def admit(self) -> None:
        """Before a write that adds data, while `pending`: the reserve is made if there is none and the disk has
        room for it twice over (else the store goes without); one given up is taken back when there is that
        room, and the write is refused (NoSpace) while there is not."""
        if not self.given_up:
            self.pending = False
            if not os.path.lexists(self.path):
                try:
                    if free_bytes(self.root) >= 2 * self.size:
                        self._take(self.size)
                except OSError:
                    pass  # no reserve on this disk: the store behaves as it did before there was one
            return
        try:
            room = free_bytes(self.root) >= 2 * self.size
            if room:
                self._take(self.size)
        except OSError:
            room = False
        if not room:
            raise NoSpace(errno.ENOSPC, f"No space left on device (ENOSPC) -- the filesystem holding store "
                          f"{self.root!r} is full but for the store's space reserve ({RESERVE}, {self.size} bytes), "
                          "given up so that deletes, close and compaction can still write: this write failed and was "
                          "not acknowledged, and every write acknowledged before it is intact; free space (delete "
                          "records and let compaction collect their blocks, or remove files elsewhere) and retry: "
                          "the store resumes writing by itself once there is room for the reserve again (no reopen "
                          "needed)")
        self.given_up = self.pending = False
        _log.info("%s: took its %d-byte space reserve back", self.root, self.size)

    def _take(self, size: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, 0)  # a partial allocation is no reserve: keep the file as given up
            raise
        finally:
            os.close(fd)
