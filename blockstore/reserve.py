"""STORE/RESERVE: disk space a writable store holds back when its disk runs low, so that a disk the store
itself filled is not a dead end. Deleting needs room (a tombstone, the directory's WAL), and so do close, the
next open (RocksDB recovers its WAL into a table) and compaction (GC copies a block's live records before the
block goes): without room held back, a store alone on its disk could never free a byte through its own API,
only by files removed elsewhere (tests/test_review_session26.py).

The reserve is `size` bytes (one block, counted as at most 1 GiB, plus 4 MiB; at most a sixteenth of the
file system), taken only while the disk is low: free space below `low` (4 reserves or 2 % of the file system,
whichever is more), looked at (one statvfs) every quarter reserve of bytes put, never per put. It is a file allocated with posix_fallocate,
so the blocks really are taken; on a roomy disk there is no file at all, and a reserve held is removed again
once free space is above twice `low`. The first NoSpace of a user write gives it up (truncated to 0 bytes,
so the file says so across a reopen), and from then on writes that add data are refused with NoSpace while
deletes, close, reopen and compaction use the room (deletes only until 3/4 of it is left: admit_delete); once
the disk has room for the reserve twice over (deletes and GC freed it, or files went elsewhere), the next write
takes it back (or drops the file, on a disk that is roomy again) and goes on."""

from __future__ import annotations

import errno
import os

from blockstore import logs
from blockstore.errors import NoSpace

RESERVE = "RESERVE"
_MIN_RESERVE = 64 << 10  # smaller than this holds back too little to be worth a file
_HEADROOM = 4 << 20  # the directory's share: a WAL recovered into a table, a new MANIFEST and WAL
# a huge block_size option (up to 1 TiB) must not hold back its own size: 2**40 took a 16.9 GB RESERVE on a 252 GB
# disk, which was "low" at once (8 such reserves were more than it had free)
_MAX_BLOCK_SHARE = 1 << 30
_FS_SHARE = 16  # at most this fraction of the file system (a 64th was too little to recover an 8 MiB tmpfs)
# deletes stop while free space is below this fraction of the reserve (admit_delete): the rest is for close, reopen
# (the directory's log recovered into a table) and compaction's first victim
_DELETE_FLOOR_NUM, _DELETE_FLOOR_DEN = 3, 4
_LOW_RESERVES = 4  # the disk is low below this many reserves free (or 2 % of it)

_log = logs.get("blocks")


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def reserve_size(root: str, block_size: int) -> int:
    """One block (what GC may copy before it frees one) plus the directory's headroom, but never more than a
    sixteenth of the file system; 0 (no reserve) when that is too small to matter."""
    st = os.statvfs(root)
    size = min(min(block_size, _MAX_BLOCK_SHARE) + _HEADROOM, st.f_blocks * st.f_frsize // _FS_SHARE)
    return size if size >= _MIN_RESERVE else 0


def low_level(st: os.statvfs_result, size: int) -> int:
    """The free space below which a disk is low: `_LOW_RESERVES` reserves of `size`, or 2 % of the file system."""
    return max(_LOW_RESERVES * size, st.f_blocks * st.f_frsize // 50)


def low_free_bytes(root: str, block_size: int) -> int | None:
    """The free bytes of the file system holding store `root` while that disk is low (as the store's reserve judges
    it), None while it is roomy or cannot be read. Compaction's GC looks once a pass: on a low disk it deletes what
    each victim emptied before it copies the next (blockstore/compaction/room.py), so the room the reserve gave up
    is enough to free the disk victim by victim."""
    try:
        st = os.statvfs(root)
        size = reserve_size(root, block_size)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    return free if free < low_level(st, size) else None


class SpaceReserve:
    """The reserve of one writable store. `check_at` is the store's bytes-put count at which the next write that
    adds data must call `admit` (at once while the reserve is given up); `admit` and `give_up` are idempotent,
    and a race between two writers at worst refuses one more put or takes the reserve one write late."""

    def __init__(self, root: str, block_size: int) -> None:
        self.root = root
        self.path = os.path.join(root, RESERVE)
        try:
            st = os.statvfs(root)
            self.size = reserve_size(root, block_size)
            self.low = low_level(st, self.size)
        except OSError:
            self.size = self.low = 0
        self.given_up = False
        self.held = False
        self.check_at = 0 if self.size else 1 << 62

    def before_open(self) -> None:
        """Before the directory is opened: what the file says (none, held, given up); on a disk with less free
        than the reserve, a reserve held is given up now (the open needs room to recover the directory's WAL)."""
        if not self.size:
            return
        try:
            held = os.path.getsize(self.path)
        except OSError:
            return
        # only give_up's truncation to 0 says given up: a held file sized for another block_size option or file
        # system size is still held (read as given up, it refused every put and was never released)
        self.given_up = held == 0
        self.held = not self.given_up
        if self.held and free_bytes(self.root) < self.size:
            self.give_up("the disk has less free space than the reserve at open")

    def give_up(self, why: str) -> None:
        """Free the reserve (truncate, so the file says it was given up) for deletes, close and compaction."""
        if not self.held:
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
        self.held, self.given_up, self.check_at = False, True, 0
        _log.warning("%s: gave up its %d-byte space reserve (%s): writes that add data are refused until the "
                     "disk has room for it again; deletes, close and compaction go on", self.root, self.size, why)

    def admit(self, bytes_put: int) -> None:
        """Before a write that adds data, once the store has put `check_at` bytes: the reserve is taken while the
        disk is low and dropped while it is roomy; one given up is taken back (or dropped) once the disk has room
        for it twice over, and the write is refused (NoSpace) while it has not."""
        try:
            free = free_bytes(self.root)
        except OSError:
            return
        self.check_at = bytes_put + max(256 << 10, self.size // 4)
        if self.given_up and free < 2 * self.size:
            self.check_at = 0
            raise NoSpace(errno.ENOSPC, f"No space left on device (ENOSPC) -- the filesystem holding store "
                          f"{self.root!r} is full but for the store's space reserve ({RESERVE}, {self.size} bytes), "
                          "given up so that deletes, close and compaction can still write: this write failed and was "
                          "not acknowledged, and every write acknowledged before it is intact; free space (delete "
                          "records and let compaction collect their blocks, or remove files elsewhere) and retry: "
                          "the store resumes writing by itself once there is room for the reserve again (no reopen "
                          "needed)")
        try:
            if free < self.low and not self.held and free >= 2 * self.size:
                self._take(self.size)
                self.held = True
                _log.info("%s: the disk is low (%d bytes free): took a %d-byte space reserve", self.root, free,
                          self.size)
            elif free >= self.low and self.given_up or free >= 2 * self.low and self.held:
                # roomy again: no reserve needed. Dead by construction (invariant 4): RESERVE holds no record, only
                # space _take allocated; no block, directory or fsck path reads or counts it
                os.unlink(self.path)
                self.held = False
        except OSError:
            pass  # no reserve on this disk now: the store behaves as it did before there was one
        self.given_up = False

    def admit_delete(self) -> None:
        """Before a delete while the reserve is given up: refused (NoSpace) once free space is below `delete_floor`,
        the part of the reserve's room kept back from deletes as the reserve is kept back from puts. Each delete
        writes a tombstone and a directory log entry and frees nothing until compaction collects its block, so
        tiny records could spend all of the room on deletes: close() then failed with NoSpace and the next open
        could not recover the directory's log into a table (review H88; tests/test_review_enospc_tiny.py)."""
        if not self.given_up:
            return
        try:
            free = free_bytes(self.root)
        except OSError:
            return
        floor = self.size * _DELETE_FLOOR_NUM // _DELETE_FLOOR_DEN
        if free < floor:
            raise NoSpace(errno.ENOSPC, f"No space left on device (ENOSPC) -- the filesystem holding store "
                          f"{self.root!r} has {free} bytes free, less than the {floor} bytes the store keeps back "
                          "from deletes once its space reserve is given up, so that close, reopen and compaction "
                          "can still write: this delete was not done and every write acknowledged before it is "
                          "intact; let compaction collect the blocks the deletes so far emptied (close the store "
                          "and run `blockstore compact` on it, or wait for the background compactor), or free "
                          f"{floor - free} bytes elsewhere, and retry")

    def _take(self, size: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            # a partial allocation is no reserve (a 0-byte file would read as one given up); it holds no record,
            # only the space this call allocated, so removing it loses nothing (invariant 4)
            os.unlink(self.path)
            raise
        os.close(fd)
