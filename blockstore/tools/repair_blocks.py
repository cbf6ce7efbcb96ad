"""Repair phase 1, the block files: foreign and orphan files to lost+found, damaged headers and footers
rewritten, blocks a crashed writer left open sealed, damaged blocks evacuated, entries of missing files dropped."""

from __future__ import annotations

import os
import time

import xxhash

from blockstore.blocks import BLOCKS_DIR, block_file_name, seal_block_file, write_block_header
from blockstore.directory import BLOCK_SEALED, DirectoryBatch, Location
from blockstore.keys import SPACE_CHUNK, SPACE_KV, reverse_prefix, suffix_ns_id
from blockstore.records import BLOCK_HEADER_SIZE, AppendRecord, BlockHeader, Footer, Kind, ScannedRecord
from blockstore.tools.fsck_decode import block_label, key_text, record_suffix
from blockstore.tools.fsck_report import BlockFacts, Report
from blockstore.tools.fsck_scan import scan_records
from blockstore.tools.repair_base import RepairBase


class BlockRepairs(RepairBase):
    """Phase 1: the block files."""

    def _phase_files(self, rep: Report) -> bool:
        did = False
        self._counters_from(rep)
        for bid, bf in sorted(rep.blocks.items()):
            if bf.path is None:
                if bf.entry is not None or any(f.kind == "missing-block" and f.block == bid for f in rep.findings):
                    self._touch()
                    self._forget(rep, bid)
                    did = True
                continue
            if bf.orphan_records:
                continue  # the directory lost them: only a rebuild (at the start of a repair) takes them back
            if bf.stillborn:  # nothing committed in it, and no header: the entry goes, the file to lost+found
                self._touch()
                self._forget(rep, bid)
                moved = self.lf.move(bf.path, block_file_name(bid), "a block a crash left without its header; "
                                     "nothing was committed in it", block=block_label(bid))
                self.block_done[bid] = f"entry dropped; file moved to lost+found/{os.path.basename(moved)}"
                did = True
                continue
            if bf.foreign or (bf.entry is None and any(f.kind == "orphan-block" and f.block == bid
                                                        for f in rep.findings)):
                why = bf.foreign or "no block-table entry and no directory entry names it"
                self.lf.move(bf.path, block_file_name(bid), why, block=block_label(bid))
                self.block_done[bid] = f"moved to lost+found/{os.path.basename(self.lf.written[-1])}"
                did = True
                continue
            if bf.needs_evacuation:
                self._touch()
                self._evacuate(rep, bf)
                did = True
                continue
            if bf.header_problem and bf.size >= BLOCK_HEADER_SIZE:
                self._touch()
                self._rewrite_header(bf)
                did = True
            if bf.unsealed:
                self._touch()
                self._seal(rep, bf)
                did = True
            elif bf.footer_problem:
                self._touch()
                self._rewrite_footer(bf)
                did = True
        return did

    def _forget(self, rep: Report, bid: int) -> None:
        """The block file is gone: drop its entry and every entry naming it."""
        assert self.dir is not None
        batch = DirectoryBatch()
        named = self._named_in(rep, bid)
        for sfx, loc in named.items():
            self._drop_place(batch, sfx, loc)
        for k, _v in self.dir.scan_prefix(reverse_prefix(bid)):
            batch.delete(bytes(k))
        batch.delete_block(bid)
        self.dir.write(batch, force_sync=True)
        self.block_done[bid] = f"block entry and {len(named)} directory entries naming it dropped"

    def _rewrite_header(self, bf: BlockFacts) -> None:
        assert bf.path is not None
        e = bf.entry
        fd = self.be.open(bf.path, False)
        try:
            old = self.be.pread(fd, BLOCK_HEADER_SIZE, 0)
            self.lf.save(block_file_name(bf.block_id) + ".header", old, bf.header_problem or "",
                         block=block_label(bf.block_id))
            h = BlockHeader(bf.block_id, self.store_id, (e.created_ns if e else 0) or time.time_ns(),
                            xxhash.xxh3_64_intdigest(e.partition) if e else 0)
            write_block_header(self.be, fd, h)
            self.be.sync(fd)
        finally:
            self.be.close(fd)
        self.block_done[bf.block_id] = "header rewritten (old header page in lost+found)"

    def _rewrite_footer(self, bf: BlockFacts) -> None:
        """A sealed block whose records all verify but whose footer does not: a new footer after them."""
        assert bf.path is not None
        data_end = bf.entry.data_end if bf.entry is not None else bf.scan_end
        fd = self.be.open(bf.path, False)
        try:
            size = self.be.size(fd)
            recs = self.be.scan(fd, BLOCK_HEADER_SIZE, data_end, False).records if data_end > BLOCK_HEADER_SIZE \
                else []
            if size > data_end:
                self.lf.save_range(f"{block_file_name(bf.block_id)}.footer@{data_end}", bf.path, data_end, size,
                                   bf.footer_problem or "", block=block_label(bf.block_id))
            self._write_footer(fd, bf.block_id, data_end, recs)
        finally:
            self.be.close(fd)
        self.block_done[bf.block_id] = "footer rewritten (old bytes in lost+found)"

    def _write_footer(self, fd: int, bid: int, data_end: int, recs: list[ScannedRecord]) -> None:
        seqs = [r.info.seq for r in recs]
        footer = Footer(bid, data_end, len(recs), min(seqs, default=0), max(seqs, default=0))
        seal_block_file(self.be, fd, footer, sync=True)

    def _seal(self, rep: Report, bf: BlockFacts) -> None:
        """What recovery does to a block a crash left open, keeping what it cuts in lost+found: the
        block ends after its last committed record that verifies."""
        assert bf.path is not None and bf.entry is not None and self.dir is not None
        e, bid = bf.entry, bf.block_id
        cut = max(BLOCK_HEADER_SIZE, min(bf.valid_end, e.data_end))
        batch = DirectoryBatch()
        dropped = 0
        for sfx, loc in self._named_in(rep, bid).items():
            if loc.offset >= cut:
                self._drop_place(batch, sfx, loc)
                dropped += 1
        fd = self.be.open(bf.path, False)
        try:
            size = self.be.size(fd)
            if size > cut:
                self.lf.save_range(f"{block_file_name(bid)}.tail@{cut}", bf.path, cut, size,
                                   "torn or uncommitted tail of a block a writer left open", block=block_label(bid),
                                   directory_entries_dropped=dropped)
            recs = self.be.scan(fd, BLOCK_HEADER_SIZE, cut, False).records if cut > BLOCK_HEADER_SIZE else []
            self._write_footer(fd, bid, cut, recs)
        finally:
            self.be.close(fd)
        self.be.dir_sync(os.path.join(self.root, BLOCKS_DIR))
        ne = e.copy()
        ne.state, ne.sealed_ns, ne.data_end = BLOCK_SEALED, time.time_ns(), cut
        ne.written_bytes = sum(r.info.record_len for r in recs)
        ne.total_records = len(recs)
        ne.tombstones = min(e.tombstones, sum(1 for r in recs if r.info.kind == Kind.TOMBSTONE))
        batch.put_block(ne)  # live counters: phase 3 re-derives them from the entries left
        self.dir.write(batch, force_sync=True)
        self.block_done[bid] = (f"sealed at {cut}; {max(0, bf.size - cut)} bytes to lost+found; {dropped} "
                                "directory entries naming them dropped")

    def _evacuate(self, rep: Report, bf: BlockFacts) -> None:
        """Copy what verifies out of a damaged block (records the directory names there, and every
        tombstone, each keeping its sequence number), re-point the directory, move the file away."""
        assert bf.path is not None and self.dir is not None
        bid = bf.block_id
        fd = self.be.open_ro(bf.path)
        try:
            size = self.be.size(fd)
            end = min(max(bf.scan_end, BLOCK_HEADER_SIZE), size)
            if bf.unsealed:  # past the committed end nothing was acknowledged (tombstones included)
                end = min(end, max(bf.committed, BLOCK_HEADER_SIZE))
            scan = scan_records(self.be, fd, BLOCK_HEADER_SIZE, end) if end > BLOCK_HEADER_SIZE else None
            by_off = {r.offset: r for r in (scan.records if scan else []) if r.payload_ok}
            starts = {r.offset for r in (scan.records if scan else [])}
            named = self._named_in(rep, bid)
            copies: list[tuple[int, bytes | None, AppendRecord]] = []  # (offset, key suffix or None, record)
            lost: list[tuple[bytes, Location]] = []
            salvaged = 0
            for sfx, loc in sorted(named.items(), key=lambda kv: kv[1].offset):
                # a place of a key with copies (docs/copies.md) is salvaged too: its other places may be
                # lost as well (a missing or damaged block repaired after this one); it keeps them
                r = by_off.get(loc.offset)
                rec = None
                if r is not None and r.info.kind != Kind.TOMBSTONE and record_suffix(r) == sfx:
                    payload = self._payload(fd, r)
                    if payload is not None:
                        rec = AppendRecord(r.info.kind, r.info.ns, bytes(r.key), bytes(r.meta), payload, r.info.seq,
                                           r.info.payload_xxh3)
                elif loc.offset not in starts:  # no record header verifies there: the entry may name the payload
                    rec = self._from_entry(fd, sfx, loc, end)
                    salvaged += rec is not None
                if rec is None:
                    lost.append((sfx, loc))
                else:
                    copies.append((loc.offset, sfx, rec))
            for r in by_off.values():
                if r.info.kind == Kind.TOMBSTONE:
                    copies.append((r.offset, None, AppendRecord(r.info.kind, r.info.ns, bytes(r.key), bytes(r.meta),
                                                                b"", r.info.seq, r.info.payload_xxh3)))
        finally:
            self.be.close(fd)
        copies.sort(key=lambda c: c[0])
        recs = [rec for _o, _s, rec in copies]
        placed, entries = self._append(recs)
        batch = DirectoryBatch()
        for (_o, csfx, rec), (nbid, pl) in zip(copies, placed):
            if csfx is None:
                continue
            loc = Location(rec.kind, pl.flags, pl.payload_off, nbid, pl.offset, pl.record_len,
                           len(rec.payload), rec.seq, pl.payload_xxh3, rec.meta)  # type: ignore[arg-type]
            batch.put_location(csfx, self._replace_place(csfx, named[csfx], loc))
        lost = [(sfx, loc) for sfx, loc in lost if not self._drop_place(batch, sfx, loc)]
        for k, _v in self.dir.scan_prefix(reverse_prefix(bid)):
            batch.delete(bytes(k))
        batch.delete_block(bid)
        for ne in entries:
            batch.put_block(ne)
        batch.put_meta("next_block", self.next_block)
        self.dir.write(batch, force_sync=True)
        moved = self.lf.move(bf.path, block_file_name(bid), "damaged block, evacuated", block=block_label(bid),
                             copied=len(copies), salvaged_by_entry=salvaged, lost_keys=[key_text(s) for s, _l in lost],
                             new_blocks=[block_label(e.block_id) for e in entries])
        self.block_done[bid] = (f"evacuated: {len(copies)} records copied to "
                                f"{', '.join(block_label(e.block_id) for e in entries) or 'nothing'}"
                                f"{f' ({salvaged} with a damaged header, by their key entry)' if salvaged else ''}, "
                                f"{len(lost)} keys lost; file moved to lost+found/{os.path.basename(moved)}")

    def _from_entry(self, fd: int, sfx: bytes, loc: Location, end: int) -> AppendRecord | None:
        """A record whose header is damaged, rebuilt from its key entry: the entry has its key (the
        suffix), kind, meta and sequence number, and names its payload by offset, length and xxh3. It is
        salvaged only when the bytes there match that length and checksum (a 64-bit hash over exactly
        the bytes the entry names: damage does not pass)."""
        space = SPACE_CHUNK if loc.kind == Kind.CHUNK else SPACE_KV
        if loc.kind not in (Kind.KV, Kind.CHUNK) or len(sfx) < 6 or sfx[4] != space:
            return None
        start = loc.payload_offset
        if loc.offset < BLOCK_HEADER_SIZE or start < loc.offset or start + loc.payload_len > end:
            return None
        data = self.be.pread(fd, loc.payload_len, start) if loc.payload_len else b""
        if len(data) != loc.payload_len or self.be.xxh3(data) != loc.payload_xxh3:
            return None
        return AppendRecord(loc.kind, suffix_ns_id(sfx), sfx[5:], loc.meta, data, loc.seq,
                            loc.payload_xxh3)
