"""The state one check pass shares among its check groups (fsck_directory.DirectoryChecks,
fsck_blocks.BlockChecks), and its directory reads, which turn RocksDB failures into one exception."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from blockstore.backend import Backend
from blockstore.directory import BlockEntry, Directory, Location
from blockstore.keys import location_key
from blockstore.records import BlockHeader
from blockstore.tools.fsck_decode import DirectoryUnreadable, decode_location
from blockstore.tools.fsck_report import Report, Unreferenced

BATCH = 1024  # directory keys per multi-get


class PassBase:
    """What one pass has learned so far, shared by its check groups; RocksDB failures while reading
    the directory surface as DirectoryUnreadable (the pass then reports the directory, not its entries)."""

    def __init__(self, root: str, backend: Backend, directory: Directory | None, writer_pid: int | None,
                 progress: Callable[[int, int], None] | None) -> None:
        self.root = root
        self.be = backend
        self.own_dir = directory is None
        self.dir = directory
        self.writer = writer_pid
        self.progress = progress
        self.rep = Report(root, writer_pid=writer_pid)
        self.entries: dict[int, BlockEntry] = {}
        self.reclaiming: dict[int, BlockEntry] = {}  # entries marked reclaiming: a normal state, not judged
        self.files: dict[int, str] = {}  # block id -> its file (by the id its verified header gives, see _names)
        self.headers: dict[str, BlockHeader | None] = {}  # file -> its header, where it verifies
        self.misnamed: dict[int, int] = {}  # block id -> the id its file's name says (files to rename)
        # per block: the key entries that name it (from the K stream) whose reverse entry is missing
        self.unindexed: dict[int, list[tuple[bytes, Location]]] = {}
        self.named_sums: dict[int, list[int]] = {}  # block -> [records, bytes, logical bytes] named by K
        self.missing_named: dict[int, int] = {}
        self.nowhere_named: dict[int, int] = {}
        self.tomb_max: dict[bytes, int] = {}
        self.newest_unnamed: dict[bytes, Unreferenced] = {}
        self.unnamed_ns: dict[int, int] = {}
        self.broken: dict[bytes, tuple[int, int, int]] = {}  # suffix of an undecodable entry -> (seq, block, off)
        self.keys = 0

    # ---- directory access that turns RocksDB failures into one exception ----
    def _iter(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        assert self.dir is not None
        it = self.dir.scan_prefix(prefix)
        while True:
            try:
                kv = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise DirectoryUnreadable(str(exc)) from exc
            yield kv

    def _mget(self, keys: Sequence[bytes]) -> list[bytes | None]:
        assert self.dir is not None
        try:
            return self.dir.multi_get(keys)
        except Exception as exc:
            raise DirectoryUnreadable(str(exc)) from exc

    def _locs(self, suffixes: Sequence[bytes]) -> list[Location | str | None]:
        raws = self._mget([location_key(s) for s in suffixes])
        return [None if r is None else decode_location(bytes(r)) for r in raws]
