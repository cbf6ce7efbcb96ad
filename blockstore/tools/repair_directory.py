"""Repair phases 2 to 5: directory entries (key, reverse, listing, block table, namespaces), counters,
records newer than the directory (superseded), and marking the store clean."""

from __future__ import annotations

import os
import time

from blockstore.blocks import BLOCKS_DIR
from blockstore.directory import BLOCK_OPEN, BLOCK_SEALED, BlockEntry, DirectoryBatch, Location
from blockstore.keys import (
    TAG_NS,
    TOMBSTONE_META,
    block_key,
    meta_key,
    namespace_id_key,
    namespace_key,
    reverse_key,
    suffix_ns_id,
)
from blockstore.records import FORMAT_VERSION, AppendRecord, Kind, ScannedRecord
from blockstore.seqfloor import min_seq_block
from blockstore.tools.fsck_decode import block_label, location_of, record_suffix
from blockstore.tools.fsck_report import Report
from blockstore.tools.fsck_scan import record_at
from blockstore.tools.repair_base import RECOVERED_PARTITION, RepairBase, block_files, unused_name


class DirectoryRepairs(RepairBase):
    """Phases 2 to 5: the directory, the counters, records newer than the directory, clean."""

    # ---- phase 2: the directory ----
    def _phase_directory(self, rep: Report) -> bool:
        assert self.dir is not None
        kinds = {"dangling", "reverse", "session-index", "block-entry", "namespace", "directory-version"}
        if not any(f.kind in kinds for f in rep.findings):
            return False
        self._touch()
        batch = DirectoryBatch()
        for k in rep.bad_keys:
            batch.delete(k)
        for k in rep.bad_reverse:
            batch.delete(k)
        for k in rep.bad_session:
            batch.delete(k)
        for sfx, (loc, _why) in sorted(rep.dangling.items()):
            ident = ("dangling", loc.block_id if loc else None, loc.offset if loc else None)
            self.done[ident] = self._fix_entry(batch, rep, sfx, loc)
        fixed = set(rep.dangling)
        for sfx, loc in rep.missing_reverse:
            if sfx not in fixed:
                batch.put(reverse_key(loc.block_id, loc.offset), sfx)
        for sk, _sfx in rep.missing_session:
            batch.put(sk, b"")
        self._fix_block_entries(batch, rep)
        self._fix_namespaces(batch, rep)
        if rep.meta.get("format_version") is None:
            batch.put_meta("format_version", FORMAT_VERSION)
        self.dir.write(batch, force_sync=True)
        return True

    def _fix_entry(self, batch: DirectoryBatch, rep: Report, sfx: bytes, loc: Location | None) -> str:
        """A key entry that does not name its record: re-derive, re-point, or drop it."""
        places: list[tuple[int, int]] = []
        if loc is not None:
            places.append((loc.block_id, loc.offset))
            places += [(c.block_id, c.offset) for c in loc.copies]  # docs/copies.md: any place that verifies
            if sfx in rep.copies:
                places.append(rep.copies[sfx])
        elif sfx in rep.broken_newest:
            places.append(rep.broken_newest[sfx])
        for bid, off in places:
            bf = rep.blocks.get(bid)
            if bf is None or bf.path is None or bf.foreign:
                continue
            fd = self.be.open_ro(bf.path)
            try:
                r = record_at(self.be, fd, off, bf.scan_end)
            finally:
                self.be.close(fd)
            if r is None or not r.payload_ok or r.info.kind == Kind.TOMBSTONE or record_suffix(r) != sfx:
                continue
            if loc is not None and r.info.seq != loc.seq and (bid, off) != (loc.block_id, loc.offset):
                continue  # another version: not the record the entry meant
            new = location_of(r, bid)  # one place: the value's copies are dropped with their reverse entries
            for other in [] if loc is None else loc.places():
                if (other.block_id, other.offset) != (bid, off) and self._reverse_names(other, sfx):
                    batch.delete(reverse_key(other.block_id, other.offset))
            batch.put_location(sfx, new)
            return "entry re-derived from its record" if (bid, off) == places[0] and loc is not None \
                else f"entry re-pointed to {block_label(bid)}:{off}"
        self._drop_key(batch, sfx, loc)
        return "entry dropped (no verified record of it)"

    def _fix_block_entries(self, batch: DirectoryBatch, rep: Report) -> None:
        for k in rep.bad_block_keys:
            batch.delete(k)
        for bid, bf in rep.blocks.items():
            needs = bid in rep.bad_block_values or (bf.entry is None and bf.path is not None and any(
                f.kind == "block-entry" and f.block == bid for f in rep.findings))
            if not needs:
                continue
            if bf.path is None or bf.foreign:
                batch.delete(block_key(bid))
                continue
            sealed = bf.footer is not None
            now = time.time_ns()
            data_end = bf.footer.data_end if bf.footer is not None else bf.valid_end
            batch.put_block(BlockEntry(
                bid, BLOCK_SEALED if sealed else BLOCK_OPEN, RECOVERED_PARTITION, written_bytes=bf.written,
                live_records=bf.live[0], live_bytes=bf.live[1], live_logical_bytes=bf.live[2],
                total_records=bf.records, tombstones=bf.tombstones, data_end=data_end,
                created_ns=bf.header.created_ns if bf.header else now, last_append_ns=now,
                sealed_ns=now if sealed else 0))
            self.done[("block-entry", bid, None)] = "entry re-created from the file"

    def _fix_namespaces(self, batch: DirectoryBatch, rep: Report) -> None:
        names = dict(rep.ns_names)  # name -> id: what reads resolve names with
        ids = {nid: name for name, nid in names.items()}
        if len(ids) != len(names):  # two names share an id: keep the one the id entry names
            for name, nid in list(names.items()):
                if rep.ns_ids.get(nid, b"") != name.encode() and list(names.values()).count(nid) > 1:
                    batch.delete(namespace_key(name))
                    del names[name]
            ids = {nid: name for name, nid in names.items()}
        for nid, raw in rep.ns_ids.items():
            if nid in ids:
                continue
            try:
                name = raw.decode()
            except UnicodeDecodeError:
                name = ""
            if name and name not in names and 1 <= len(raw) <= 255:
                names[name] = nid  # an id entry whose name entry was lost: believe it
                ids[nid] = name
                batch.put(TAG_NS + raw, nid.to_bytes(4, "little"))
            else:
                batch.delete(namespace_id_key(nid))
        for nid in sorted(rep.ns_used | rep.ns_records):
            if nid not in ids:
                name = unused_name(f"recovered-ns-{nid}", names)
                names[name] = nid
                ids[nid] = name
                batch.put(namespace_key(name), nid.to_bytes(4, "little"))
        for nid, name in ids.items():
            if rep.ns_ids.get(nid) != name.encode():
                batch.put(namespace_id_key(nid), name.encode())

    # ---- phase 3: counters ----
    def _phase_counters(self, rep: Report) -> bool:
        assert self.dir is not None
        if not any(f.kind in ("block-counts", "counter") for f in rep.findings):
            return False
        self._touch()
        batch = DirectoryBatch()
        for bf in rep.blocks.values():
            if bf.derived is not None and bf.entry is not None and bf.derived != bf.entry:
                batch.put_block(bf.derived)
        meta = rep.meta
        self._counters_from(rep)
        want = {"next_seq": self.next_seq, "next_block": self.next_block,
                "next_ns": max(meta.get("next_ns") or 1, rep.max_ns + 1)}
        for name, value in want.items():
            have = meta.get(name)
            if have is None or have < value:
                batch.put_meta(name, value)
        entries = [bf.derived or bf.entry for bf in rep.blocks.values() if bf.entry is not None]
        if meta.get("bytes_put") is None:
            batch.put_meta("bytes_put", sum(e.live_logical_bytes for e in entries if e is not None))
        if meta.get("bytes_written") is None:
            batch.put_meta("bytes_written", sum(e.written_bytes for e in entries if e is not None))
        if meta.get("clean") is None:
            batch.put_meta("clean", 0)
        for name in rep.bad_counters:  # an eviction floor counter (seqfloor.py): unknown is safe (eviction refuses)
            if name not in meta:
                batch.delete(meta_key(name))
                self.done[("counter", min_seq_block(name), None)] = "counter dropped"
        self.dir.write(batch, force_sync=True)
        return True

    # ---- phase 4: records newer than the directory ----
    def _phase_unreferenced(self, rep: Report) -> bool:
        assert self.dir is not None
        if not rep.unreferenced:
            return False
        self._touch()
        self._counters_from(rep)
        recs: list[AppendRecord] = []
        what: list[tuple[bytes, Location | None, ScannedRecord | None]] = []
        for u in rep.unreferenced:
            sfx = u.suffix
            nid, space, key = suffix_ns_id(sfx), sfx[4], sfx[5:]
            seq = self.next_seq
            self.next_seq += 1
            if u.entry is None:
                recs.append(AppendRecord(Kind.TOMBSTONE, nid, key, TOMBSTONE_META[space], b"", seq))
                what.append((sfx, None, None))
                continue
            bf = rep.blocks.get(u.entry.block_id)
            r = None
            payload = None
            if bf is not None and bf.path is not None:
                fd = self.be.open_ro(bf.path)
                try:
                    r = record_at(self.be, fd, u.entry.offset, bf.scan_end)
                    payload = self._payload(fd, r) if r is not None and r.payload_ok else None
                finally:
                    self.be.close(fd)
            if r is None or payload is None or record_suffix(r) != sfx:
                continue  # its entry is broken: the dangling repair handles it
            recs.append(AppendRecord(r.info.kind, nid, key, bytes(r.meta), payload, seq, r.info.payload_xxh3))
            what.append((sfx, u.entry, r))
        if not recs:
            return False
        placed, entries = self._append(recs)
        batch = DirectoryBatch()
        moved_from: dict[int, list[int]] = {}
        for (sfx, old, r), rec, (nbid, pl) in zip(what, recs, placed):
            if old is None or r is None:
                self.done[("unreferenced", None, None)] = "superseded"
                continue
            new = Location(rec.kind, pl.flags, pl.payload_off, nbid, pl.offset, pl.record_len, r.info.payload_len,
                           rec.seq, pl.payload_xxh3, bytes(r.meta))
            batch.put_location(sfx, new)
            for place in old.places():  # its copies retire with it (docs/copies.md)
                if self._reverse_names(place, sfx):
                    batch.delete(reverse_key(place.block_id, place.offset))
                d = moved_from.setdefault(place.block_id, [0, 0, 0])
                d[0] += 1
                d[1] += place.record_len
                if (place.block_id, place.offset) == (old.block_id, old.offset):  # logical: primary only
                    d[2] += len(sfx) - 5 + place.payload_len
        for bid, (n, b, lg) in moved_from.items():
            bf = rep.blocks.get(bid)
            if bf is not None and bf.entry is not None:
                e = (bf.derived or bf.entry).copy()
                e.live_records, e.live_bytes, e.live_logical_bytes = (
                    max(0, e.live_records - n), max(0, e.live_bytes - b), max(0, e.live_logical_bytes - lg))
                batch.put_block(e)
        for ne in entries:
            batch.put_block(ne)
        batch.put_meta("next_seq", self.next_seq)
        batch.put_meta("next_block", self.next_block)
        self.dir.write(batch, force_sync=True)
        for u in rep.unreferenced:
            self.done[("unreferenced", u.block_id, u.offset)] = (
                "superseded by a tombstone (the key stays absent)" if u.entry is None else
                "superseded by a fresh copy of the entry's record (the key keeps its value)")
        return True

    # ---- phase 5: clean ----
    def _phase_clean(self, rep: Report) -> bool:
        assert self.dir is not None
        if rep.findings and any(f.kind != "unclean" for f in rep.findings):
            return False
        if rep.meta.get("clean") == 1:
            return False
        for p in block_files(self.root):
            fd = self.be.open_ro(p)
            try:
                self.be.sync(fd)
            finally:
                self.be.close(fd)
        self.be.dir_sync(os.path.join(self.root, BLOCKS_DIR))
        self.dir.flush()
        b = DirectoryBatch()
        b.put_meta("clean", 1)
        self.dir.write(b, force_sync=True)
        self.done[("unclean", None, None)] = "blocks synced, store marked clean"
        return True
