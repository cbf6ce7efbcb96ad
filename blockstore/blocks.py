"""Block files: creation, sealing, descriptors for readers, and deletion that waits for readers.

A block is deleted only when nothing in it is live (the store decides) *and* no reader holds it
(this module decides): `pinned()` marks blocks in use for the length of a batched read, and a
deletion requested meanwhile happens when the last pin is released (invariant 4).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from blockstore.backend import Backend
from blockstore.directory import BlockEntry
from blockstore.errors import CorruptionError, NotFound
from blockstore.records import BLOCK_HEADER_SIZE, BlockHeader, Footer

BLOCKS_DIR = "blocks"


def block_file_name(block_id: int) -> str:
    return f"{block_id:016x}.blk"


_HEX_DIGITS = frozenset("0123456789abcdef")


def block_id_of(name: str) -> int | None:
    """The block id a file name in blocks/ names, None if it is not a block file's name: exactly what
    `block_file_name` writes, 16 lower-case hex digits. int(.., 16) also takes a sign, a 0x prefix,
    underscores, blanks and upper case, so a stray '+000000000000001.blk' was block 1: fsck judged it in
    place of the block's own file, and repair evacuated the good block and moved the stray to lost+found
    under the block's name, leaving a store whose directory no longer named its block 1."""
    if len(name) == 20 and name.endswith(".blk") and _HEX_DIGITS.issuperset(name[:16]):
        return int(name[:16], 16)
    return None


def _block_files(folder: str, names: Iterable[str]) -> dict[int, str]:
    out = {}
    for name in names:
        bid = block_id_of(name)
        if bid is not None:
            out[bid] = os.path.join(folder, name)
    return out


def list_block_files(root: str) -> dict[int, str]:
    """Block id -> path of every block file of the store at `root` ({} when it has no blocks/): for
    tools that look at a store without opening it."""
    folder = os.path.join(root, BLOCKS_DIR)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return {}
    except NotADirectoryError:  # fsck stopped with a bare "[Errno 20] Not a directory"
        raise CorruptionError(f"{folder!r} is not a folder: the store's block files are not there (restore the "
                              "folder; repair changes nothing until then)") from None
    return _block_files(folder, names)


def write_block_header(backend: Backend, fd: int, header: BlockHeader) -> None:
    """Write a block's header page (the encoded header, zero-padded to BLOCK_HEADER_SIZE) at offset 0."""
    raw = backend.encode_block_header(header)
    backend.pwrite(fd, raw + bytes(BLOCK_HEADER_SIZE - len(raw)), 0)


def seal_block_file(backend: Backend, fd: int, footer: Footer, *, sync: bool) -> None:
    """Seal a block file: cut it at `footer.data_end` (the end of its last good record), write the footer
    there, and fdatasync it if `sync` (docs/format.md §2.3). Used by the writer, recovery and repair."""
    backend.truncate(fd, footer.data_end)
    backend.pwrite(fd, backend.encode_footer(footer), footer.data_end)
    if sync:
        backend.sync(fd)


@dataclass(slots=True)
class OpenBlock:
    """A block being appended to, owned by the writer."""

    entry: BlockEntry
    fd: int
    tail: int
    min_seq: int = 0
    max_seq: int = 0
    records: int = 0  # appended and committed, for the footer


class BlockFiles:
    def __init__(self, root: str, backend: Backend, store_id: int, *, sync: bool, max_read_fds: int = 256) -> None:
        self.folder = os.path.join(root, BLOCKS_DIR)  # a path (Store.dir is the RocksDB directory)
        self.backend = backend
        self.store_id = store_id
        self.sync = sync
        self._lock = threading.Lock()
        self._read_fds: OrderedDict[int, int] = OrderedDict()
        self._max_read_fds = max_read_fds
        self._pins: dict[int, int] = {}
        self._doomed: set[int] = set()
        self._closed = False  # close() ran: the descriptors of blocks still pinned close when their pins end

    def path(self, block_id: int) -> str:
        return os.path.join(self.folder, block_file_name(block_id))

    def exists(self, block_id: int) -> bool:
        return os.path.exists(self.path(block_id))

    def list_files(self) -> dict[int, str]:
        return _block_files(self.folder, os.listdir(self.folder))

    # ---- writer side ----
    def create(self, block_id: int, partition_hash: int) -> int:
        """Create the file with its header; durable before any record can point into it. Refuses an id
        whose file exists (the writer holds the store's lock, so nothing races this check): such a
        file is one the directory lost track of, and overwriting it would destroy its records."""
        if self.exists(block_id):
            raise CorruptionError(f"block file {self.path(block_id)} exists but the directory does not name it; "
                                  "run `blockstore fsck --repair`")
        fd = self.backend.open(self.path(block_id), True)
        try:
            write_block_header(self.backend, fd, BlockHeader(block_id, self.store_id, time.time_ns(), partition_hash))
            if self.sync:
                self.backend.sync(fd)
                self.backend.dir_sync(self.folder)
        except BaseException:
            self.backend.close(fd)
            try:
                self.backend.unlink(self.path(block_id))
            except Exception:
                pass
            raise
        return fd

    def seal(self, block: OpenBlock) -> None:
        """Truncate to the last good record and write the footer; durable now in sync mode, and in
        cache mode by the store's close() (which syncs every block sealed in the session)."""
        footer = Footer(block.entry.block_id, block.tail, block.records, block.min_seq, block.max_seq)
        seal_block_file(self.backend, block.fd, footer, sync=self.sync)

    def read_footer(self, fd: int) -> Footer | None:
        """The footer if the file is a validly sealed block, else None."""
        size = self.backend.size(fd)
        if size < BLOCK_HEADER_SIZE + 64:
            return None
        try:
            f = self.backend.decode_footer(self.backend.pread(fd, 64, size - 64))
        except Exception:
            return None
        return f if f.data_end == size - 64 else None

    def drop_page_cache(self) -> None:
        """Evict the block files from the OS page cache (cold-read benchmarks)."""
        for p in self.list_files().values():
            try:
                fd = self.backend.open_ro(p)
            except NotFound:
                continue
            try:
                self.backend.drop_cache(fd)
            finally:
                self.backend.close(fd)

    # ---- reader side ----
    @contextmanager
    def pinned(self, block_ids: Iterable[int]) -> Iterator[None]:
        ids = list(set(block_ids))
        with self._lock:
            for bid in ids:
                self._pins[bid] = self._pins.get(bid, 0) + 1
        try:
            yield
        finally:
            doomed, late = [], []
            with self._lock:
                for bid in ids:
                    n = self._pins[bid] - 1
                    if n:
                        self._pins[bid] = n
                    else:
                        del self._pins[bid]
                        if bid in self._doomed:
                            doomed.append(bid)
                        elif self._closed and bid in self._read_fds:
                            late.append(self._read_fds.pop(bid))
            for bid in doomed:
                self._unlink(bid)
            for fd in late:
                self.backend.close(fd)

    def read_fd(self, block_id: int) -> int:
        """A cached read-only descriptor. Call only while the block is pinned."""
        with self._lock:
            fd = self._read_fds.get(block_id)
            if fd is not None:
                self._read_fds.move_to_end(block_id)
                return fd
        try:
            fd = self.backend.open_ro(self.path(block_id))
        except NotFound:
            raise NotFound(f"block file {block_file_name(block_id)} is missing") from None
        evict = []
        with self._lock:
            if block_id in self._read_fds:  # another thread won the race
                evict.append(fd)
                fd = self._read_fds[block_id]
            else:
                self._read_fds[block_id] = fd
                while len(self._read_fds) > self._max_read_fds:
                    old, ofd = next(iter(self._read_fds.items()))
                    if old in self._pins:
                        self._read_fds.move_to_end(old)
                        if all(b in self._pins for b in self._read_fds):
                            break
                        continue
                    del self._read_fds[old]
                    evict.append(ofd)
        for e in evict:
            self.backend.close(e)
        return fd

    def delete(self, block_id: int) -> None:
        """Delete now, or when the last reader releases it."""
        with self._lock:
            if block_id in self._pins:
                self._doomed.add(block_id)
                return
        self._unlink(block_id)

    def _unlink(self, block_id: int) -> None:
        with self._lock:
            self._doomed.discard(block_id)
            fd = self._read_fds.pop(block_id, None)
        if fd is not None:
            self.backend.close(fd)
        try:
            self.backend.unlink(self.path(block_id))
        except NotFound:
            pass
        if self.sync:
            self.backend.dir_sync(self.folder)

    def close(self) -> None:
        # not the descriptors of blocks a reader still holds (a read racing Store.close()): closed under it, its
        # preadv got EBADF, or read whatever file took the number meanwhile; they close when the read ends
        with self._lock:
            self._closed = True
            fds = [self._read_fds.pop(bid) for bid in list(self._read_fds) if bid not in self._pins]
        for fd in fds:
            try:
                self.backend.close(fd)
            except Exception:
                pass
