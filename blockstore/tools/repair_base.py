"""The state a repair shares among its phases (repair_blocks.BlockRepairs, repair_directory.DirectoryRepairs,
repair.py), and the steps they all use: marking the store unclean, dropping a key's entries, appending
records to new sealed blocks of the repair stream."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace

import xxhash

from blockstore.backend import Backend
from blockstore.blocks import BLOCKS_DIR, block_file_name, block_id_of, seal_block_file, write_block_header
from blockstore.directory import BLOCK_SEALED, BlockEntry, Directory, DirectoryBatch, Location
from blockstore.keys import SPACE_CHUNK, chunk_session_key, location_key, reverse_key, reverse_prefix
from blockstore.manifest import DEFAULT_BLOCK_SIZE
from blockstore.records import (
    BLOCK_HEADER_SIZE,
    PAGE,
    AppendRecord,
    BlockHeader,
    Footer,
    Kind,
    Placement,
    ScannedRecord,
    aligned_flags,
    record_layout,
)
from blockstore.tools.fsck_decode import decode_location
from blockstore.tools.fsck_report import Finding, Report
from blockstore.tools.lost_found import LostFound

REPAIR_PARTITION = b"\0fsck/repair"  # the stream of blocks repair writes (copies, tombstones)
RECOVERED_PARTITION = b"\0fsck/recovered"  # the partition of a block-table entry re-created from its file


class RepairBase:
    """What a repair knows (the store's id, block size and counters, lost+found, what was done for
    which finding), and the steps its phases share."""

    def __init__(self, root: str, backend: Backend, namespaces: list[str],
                 progress: Callable[[int, int], None] | None, namespace_ids: dict[int, str] | None = None) -> None:
        self.root = root
        self.known_names = namespace_ids or {}  # id -> name known for certain (a restore's index objects)
        self.be = backend
        self.candidates = ["default", *[n for n in namespaces if n != "default"]]
        self.progress = progress
        self.lf = LostFound(root)
        self.dir: Directory | None = None
        self.seen: dict[tuple[str, int | None, int | None, str], Finding] = {}
        self.done: dict[tuple[str, int | None, int | None], str] = {}  # (kind, block, offset) -> what was done
        self.block_done: dict[int, str] = {}
        self.marked_unclean = False
        self.initially_unclean = False
        self.store_id = 0
        self.block_size = DEFAULT_BLOCK_SIZE
        self.next_seq = 1
        self.next_block = 1

    def _touch(self) -> None:
        """Before the first change: the store is unclean until repair has finished (a crash meanwhile
        makes the next writer run recovery)."""
        if self.marked_unclean:
            return
        assert self.dir is not None
        b = DirectoryBatch()
        b.put_meta("clean", 0)
        self.dir.write(b, force_sync=True)
        self.marked_unclean = True

    def _counters_from(self, rep: Report) -> None:
        self.next_seq = max(rep.meta.get("next_seq") or 1, rep.max_seq + 1, self.next_seq)
        self.next_block = max(rep.meta.get("next_block") or 1, rep.max_block + 1, self.next_block,
                              max(rep.blocks, default=0) + 1)

    def _named_in(self, rep: Report, bid: int) -> dict[bytes, Location]:
        """Key entries naming block `bid` (through the reverse index, or found without one)."""
        assert self.dir is not None
        out: dict[bytes, Location] = {}
        rev = [(int.from_bytes(k[9:17], "big"), bytes(v))
               for k, v in self.dir.scan_prefix(reverse_prefix(bid)) if len(k) == 17]
        raws = self.dir.multi_get([location_key(s) for _o, s in rev])
        for (off, sfx), raw in zip(rev, raws):
            loc = None if raw is None else decode_location(bytes(raw))
            if isinstance(loc, Location) and loc.holds(bid, off):  # the primary or a copy (docs/copies.md)
                out[sfx] = next(p for p in loc.places() if (p.block_id, p.offset) == (bid, off))
        for sfx, loc in rep.missing_reverse:
            if loc.block_id == bid:
                out.setdefault(sfx, loc)
        for sfx, (dloc, _why) in rep.dangling.items():
            if dloc is not None and dloc.block_id == bid:
                out.setdefault(sfx, dloc)
        return out

    def _drop_key(self, batch: DirectoryBatch, sfx: bytes, loc: Location | None) -> None:
        batch.delete(location_key(sfx))
        if loc is not None:
            assert self.dir is not None
            if self.dir.get(reverse_key(loc.block_id, loc.offset)) == sfx:
                batch.delete(reverse_key(loc.block_id, loc.offset))
            if sfx[4] == SPACE_CHUNK:
                sk = chunk_session_key(sfx, loc)
                if sk is not None:
                    batch.delete(sk)

    def _replace_place(self, sfx: bytes, place: Location, new: Location) -> Location:
        """The key's value with `place` (evacuated from a damaged block) replaced by `new`, the same record
        copied out: a key with copies (docs/copies.md) keeps them, the salvaged place staying primary if
        `place` was. Reads the entry as the directory holds it now."""
        assert self.dir is not None
        raw = self.dir.get(location_key(sfx))
        value = None if raw is None else decode_location(bytes(raw))
        if not isinstance(value, Location) or not value.copies or not value.holds(place.block_id, place.offset):
            return new
        if (value.block_id, value.offset) == (place.block_id, place.offset):
            return replace(new, copies=value.copies)
        return value.without(place.block_id, place.offset).with_copy(new)

    def _drop_place(self, batch: DirectoryBatch, sfx: bytes, place: Location) -> bool:
        """The key's entry stops naming `place`: a key with copies keeps its other places (True), one
        without is dropped (False). Reads the entry as the directory holds it now."""
        assert self.dir is not None
        raw = self.dir.get(location_key(sfx))
        value = None if raw is None else decode_location(bytes(raw))
        if isinstance(value, Location) and value.copies and value.holds(place.block_id, place.offset):
            batch.put_location(sfx, value.without(place.block_id, place.offset))
            batch.forget_place(place)
            return True
        self._drop_key(batch, sfx, place)
        return False

    def _reverse_names(self, loc: Location, sfx: bytes) -> bool:
        assert self.dir is not None
        return self.dir.get(reverse_key(loc.block_id, loc.offset)) == sfx

    def _payload(self, fd: int, r: ScannedRecord) -> bytes | None:
        """The payload, verified again as it is read for the copy (never copy bytes that fail)."""
        data = self.be.pread(fd, r.info.payload_len, r.offset + r.info.payload_off)
        if len(data) != r.info.payload_len or self.be.xxh3(data) != r.info.payload_xxh3:
            return None
        return data

    def _append(self, recs: list[AppendRecord]) -> tuple[list[tuple[int, Placement]], list[BlockEntry]]:
        """Write records into new sealed blocks of the repair stream (synced, and `blocks/` too, before
        any directory entry names them). Returns each record's (block, placement) and the new entries."""
        placed: list[tuple[int, Placement]] = []
        entries: list[BlockEntry] = []
        i = 0
        while i < len(recs):
            group: list[AppendRecord] = []
            tail = BLOCK_HEADER_SIZE
            while i < len(recs):
                r = recs[i]
                plen = len(r.payload)  # type: ignore[arg-type]
                _poff, rlen = record_layout(tail, len(r.key), len(r.meta), plen, aligned_flags(plen))
                if group and tail + rlen + PAGE > self.block_size:
                    break
                group.append(r)
                tail += rlen
                i += 1
            bid = self.next_block
            self.next_block += 1
            path = os.path.join(self.root, BLOCKS_DIR, block_file_name(bid))
            fd = self.be.open(path, True)
            try:
                now = time.time_ns()
                write_block_header(self.be, fd, BlockHeader(bid, self.store_id, now,
                                                             xxhash.xxh3_64_intdigest(REPAIR_PARTITION)))
                pls, end = self.be.append(fd, BLOCK_HEADER_SIZE, group, True)
                seqs = [r.seq for r in group]
                seal_block_file(self.be, fd, Footer(bid, end, len(group), min(seqs), max(seqs)), sync=True)
            finally:
                self.be.close(fd)
            live = [(r, p) for r, p in zip(group, pls) if r.kind != Kind.TOMBSTONE]
            entries.append(BlockEntry(
                bid, BLOCK_SEALED, REPAIR_PARTITION, written_bytes=sum(p.record_len for p in pls),
                live_bytes=sum(p.record_len for _r, p in live), live_records=len(live), total_records=len(group),
                tombstones=len(group) - len(live), data_end=end, created_ns=now, last_append_ns=now, sealed_ns=now,
                live_logical_bytes=sum(len(r.key) + len(r.payload) for r, _p in live),  # type: ignore[arg-type]
            ))
            placed.extend((bid, p) for p in pls)
        if recs:
            self.be.dir_sync(os.path.join(self.root, BLOCKS_DIR))
        return placed, entries


def block_files(root: str) -> list[str]:
    d = os.path.join(root, BLOCKS_DIR)
    return [os.path.join(d, n) for n in sorted(os.listdir(d)) if block_id_of(n) is not None] if os.path.isdir(d) else []


def unused_name(base: str, taken: dict[str, int]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}.{n}"
    return name
