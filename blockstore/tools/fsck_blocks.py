"""Block-side checks of a pass: each block file's header, footer, records and payloads, the key entries
that name its records, the records no entry names, and its block-table counters."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from blockstore.directory import BLOCK_OPEN, Location
from blockstore.errors import CorruptionError, FormatVersionError, IOErrorBS, NotFound
from blockstore.keys import reverse_key, reverse_prefix, suffix_ns_id
from blockstore.records import BLOCK_HEADER_SIZE, FOOTER_SIZE, Kind, ScannedRecord
from blockstore.tools.fsck_decode import block_label, key_text, location_of, record_suffix
from blockstore.tools.fsck_pass import BATCH, PassBase
from blockstore.tools.fsck_report import BlockFacts, Unreferenced
from blockstore.tools.fsck_scan import NEWER_RECORD, Scan, scan_records


def _not_a_block_file(path: str) -> str | None:
    """What is at a block file's name when it cannot be a block: a link to nothing (a writer makes no links, and
    deletes a file, never its target), or a FIFO, socket or device (reading one hangs or reads something else;
    every read path refuses it, backend.refuse_special_file); None for a file (or a folder, checked as one)."""
    if os.path.islink(path) and not os.path.exists(path):
        return "a symbolic link to a missing file"
    try:
        mode = os.stat(path).st_mode
    except OSError:  # gone since it was listed: the block check says so
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device, not a file"


class BlockChecks(PassBase):
    """The block side of a pass: one block file at a time, against what the directory side learned."""

    def _blocks(self) -> None:
        rep = self.rep
        named = set(self.named_sums) | set(self.unindexed) | set(self.missing_named)
        # a block marked reclaiming is not judged (unless key entries still name it)
        ids = sorted((set(self.entries) | set(self.files) | set(self.missing_named)) - (set(self.reclaiming) - named))
        rep.max_block = max([rep.max_block, *self.reclaiming])
        total = 0
        for bid in ids:
            p = self.files.get(bid)
            if p is not None:
                try:
                    total += os.path.getsize(p)
                except OSError:
                    pass
        done = 0
        for bid in ids:
            path = self.files.get(bid)
            facts = BlockFacts(bid, path, entry=self.entries.get(bid))
            rep.blocks[bid] = facts
            if bid in self.entries or bid in named or bid in self.reclaiming:
                # what the directory accounts for; a file it does not name is an orphan, not a counter finding
                rep.max_block = max(rep.max_block, bid)
            if bid in self.misnamed:
                facts.misnamed = self.misnamed[bid]
                rep.add("misnamed-block", self.misnamed[bid], None,
                        f"file {block_label(self.misnamed[bid])}.blk holds block {block_label(bid)} (its verified "
                        f"header says so): checked as {block_label(bid)}.blk")
            if path is None:
                e = facts.entry
                if e is not None and e.state == BLOCK_OPEN and e.data_end <= BLOCK_HEADER_SIZE \
                        and e.total_records == 0 and bid not in self.missing_named:
                    # named (synced) before its file is created: a writer stopped in between
                    if self.writer is None:
                        rep.add("unsealed", bid, None, "left open by a writer that stopped between naming the "
                                "block and creating its file: nothing was committed in it")
                    continue
                if e is not None and e.remote_name and bid not in self.missing_named:
                    # dropped once its object was confirmed (docs/remote.md): not damage, and not checked here
                    rep.notes.append(f"block {block_label(bid)}: its local copy was dropped; its records are in "
                                     f"object {e.remote_name.decode(errors='replace')!r} (not checked here)")
                    continue
                if facts.entry is not None or bid in self.missing_named:
                    n = self.missing_named.get(bid, 0)
                    rep.add("missing-block", bid, None, f"block file {block_label(bid)}.blk is missing; "
                            f"{n} directory entries name records in it (lost)")
                continue
            why = _not_a_block_file(path)
            if why is not None:  # damage: a writer makes neither; repair moves it to lost+found like any foreign file
                facts.foreign = f"block file {block_label(bid)}.blk is {why}"
                rep.add("block-header" if facts.entry is not None else "orphan-block", bid, None, facts.foreign)
                continue
            try:
                self._block(facts)
            except NotFound:  # deleted since it was listed
                facts.path = None
                if facts.entry is not None:
                    rep.add("missing-block", bid, None, f"block file {block_label(bid)}.blk vanished during the check")
            except IOErrorBS as exc:  # a folder where the file belongs, a failing disk: say which file, check no further
                todo = (" (a folder where a block file belongs: put the block file back, or move the folder out of "
                        "blocks/, and run fsck again; nothing was changed)" if facts.path and os.path.isdir(facts.path)
                        else "")
                raise IOErrorBS(exc.errno or errno.EIO, f"cannot read block file {facts.path}: {exc}{todo}") from exc
            done += facts.size
            if self.progress is not None:
                self.progress(done, total)

    def _block(self, bf: BlockFacts) -> None:
        rep, be, bid = self.rep, self.be, bf.block_id
        assert bf.path is not None
        bf.live = tuple(self.named_sums.get(bid, (0, 0, 0)))  # type: ignore[assignment]
        fd = be.open_ro(bf.path)
        try:
            bf.size = be.size(fd)
            self._header(bf, fd)
            e = bf.entry
            referenced = bid in self.named_sums or bid in self.unindexed
            if e is not None and bf.header is None and not bf.foreign and e.state == BLOCK_OPEN \
                    and e.data_end <= BLOCK_HEADER_SIZE and e.total_records == 0 and not referenced:
                # named (synced) before its file is created, and the header written after: a writer that
                # stopped (or is) in between left a file without a valid header and nothing committed
                if self.writer is None:
                    bf.stillborn = True
                    rep.add("unsealed", bid, None, f"left open by a writer that stopped while creating its file "
                            f"({bf.size} bytes, no valid header): nothing was committed in it")
                return
            if self.dir is not None and e is None and bid not in rep.bad_block_values:
                if self.writer is not None and not referenced:
                    rep.notes.append(f"block {block_label(bid)} is not in the directory snapshot (created by the "
                                     "live writer since): not judged")
                    return
                if not referenced:
                    self._orphan(bf, fd)
                    return
                rep.add("block-entry", bid, None, f"directory entries point into block {block_label(bid)}, "
                        "which has no block-table entry")
            if bf.foreign:
                rep.add("block-header", bid, None, bf.foreign)
                return
            if bf.header_problem:
                rep.add("block-header", bid, None, bf.header_problem)
            self._footer(bf, fd)
            if e is not None:
                live_open = e.state == BLOCK_OPEN and self.writer is not None
                bf.sealed = e.state != BLOCK_OPEN
                bf.unsealed = e.state == BLOCK_OPEN and self.writer is None
                committed = bf.committed = e.data_end
                if live_open:
                    end = min(committed, bf.size)
                    bf.truncated = bf.size < committed
                elif bf.unsealed:
                    end = bf.size
                else:  # a footer that verifies and ends the file says where the data ends, whatever the table says
                    end = bf.footer.data_end if bf.footer is not None else min(committed, bf.size)
                    bf.truncated = bf.footer is None and bf.size < committed
            else:  # no directory: the footer says whether it is sealed
                committed = bf.footer.data_end if bf.footer is not None else bf.size
                bf.sealed = bf.footer is not None
                end = committed
            end = max(BLOCK_HEADER_SIZE, end)
            bf.scan_end = end
            scan = scan_records(be, fd, BLOCK_HEADER_SIZE, end) if bf.size > BLOCK_HEADER_SIZE else Scan([], [])
            self._records(bf, scan, committed)
            self._problems(bf, scan, committed)
            if self.dir is not None:
                self._named(bf, fd, scan, committed)
            self._counts(bf, scan)
        finally:
            be.close(fd)

    def _header(self, bf: BlockFacts, fd: int) -> None:
        sid = self.rep.store_id
        if bf.size < 64:
            bf.header_problem = f"the file has {bf.size} bytes: no block header"
            return
        try:
            h = self.be.decode_block_header(self.be.pread(fd, 64, 0))
        except FormatVersionError:
            bf.header_problem = "block header of a newer format version"
            self.rep.newer_format = True
            return
        except CorruptionError as exc:
            bf.header_problem = f"block header does not verify ({type(exc).__name__})"
            return
        bf.header = h
        if sid is not None and h.store_id != sid:
            bf.foreign = f"block header names store {h.store_id}, not this store ({sid}): a block of another store"
        elif h.block_id != bf.block_id:
            bf.foreign = f"block header names block {block_label(h.block_id)}, not the file's {block_label(bf.block_id)}"

    def _footer(self, bf: BlockFacts, fd: int) -> None:
        if bf.size < BLOCK_HEADER_SIZE + FOOTER_SIZE:
            return
        try:
            f = self.be.decode_footer(self.be.pread(fd, FOOTER_SIZE, bf.size - FOOTER_SIZE))
        except FormatVersionError:
            self.rep.newer_format = bf.footer_newer = True
            return
        except CorruptionError:
            return
        if f.data_end == bf.size - FOOTER_SIZE and f.block_id == bf.block_id:
            bf.footer = f

    def _orphan(self, bf: BlockFacts, fd: int) -> None:
        scan = scan_records(self.be, fd, BLOCK_HEADER_SIZE, bf.size) if bf.size > BLOCK_HEADER_SIZE else Scan([], [])
        good = sum(1 for r in scan.records if r.payload_ok)
        bf.records = len(scan.records)
        ours = bf.header is not None and not bf.foreign
        detail = (f"no block-table entry names block {block_label(bf.block_id)} and no directory entry points "
                  f"into it ({bf.size} bytes, {good} records that verify)")
        if ours and good:
            bf.orphan_records = good
            detail += ": a block of this store, so the directory lost writes"
        self.rep.add("orphan-block", bf.block_id, None, detail)

    def _records(self, bf: BlockFacts, scan: Scan, committed: int) -> None:
        rep = self.rep
        valid_end = BLOCK_HEADER_SIZE
        contiguous = True
        for r in scan.records:
            if contiguous and r.offset == valid_end and r.payload_ok:
                valid_end = r.offset + r.info.record_len
            else:
                contiguous = False
            if bf.unsealed and r.offset >= committed:
                continue  # uncommitted: the seal at repair cuts it
            bf.records += 1
            bf.written += r.info.record_len
            rep.ns_records.add(r.info.ns)
            bf.min_seq = min(bf.min_seq or r.info.seq, r.info.seq)
            bf.max_seq = max(bf.max_seq, r.info.seq)
            rep.max_seq = max(rep.max_seq, r.info.seq)
            if r.info.kind == Kind.TOMBSTONE:
                bf.tombstones += 1
            if not r.payload_ok:
                bf.bad_payloads.append(r.offset)
        bf.valid_end = valid_end
        bf.damaged = scan.damaged

    def _problems(self, bf: BlockFacts, scan: Scan, committed: int) -> None:
        rep, bid = self.rep, bf.block_id
        if bf.unsealed:
            cut = min(bf.valid_end, committed)
            bad = [r.offset for r in scan.records if r.offset < committed and not r.payload_ok]
            detail = (f"left open by a writer that stopped without closing; committed data ends at {committed}, "
                      f"records verify up to {bf.valid_end} of {bf.size} bytes")
            if cut < committed:
                detail += f"; committed records from {cut} are torn or damaged"
            if bad:
                detail += f" ({len(bad)} payloads do not verify)"
            rep.add("unsealed", bid, None, detail)
            return
        if bf.truncated and bf.entry is not None:
            rep.add("truncated", bid, bf.size, f"the file ends at {bf.size}, before its data end {bf.entry.data_end}; "
                    "records past it are cut off")
        for off, resumed, why in scan.damaged:
            if bf.truncated and resumed >= bf.scan_end and why.startswith(("torn", "a record of")):
                continue  # the cut itself: reported as truncated
            skipped = f"; the scan resumed at {resumed}" if resumed < bf.scan_end else "; nothing after it verifies"
            rep.add("record", bid, off, why + skipped)
            if why == NEWER_RECORD:
                rep.newer_format = True  # not damage: repair refuses rather than evacuate it
        for r in scan.records:
            if not r.payload_ok:
                rep.add("payload", bid, r.offset, f"payload of {Kind(r.info.kind).name.lower()} record seq "
                        f"{r.info.seq} of {key_text(record_suffix(r))} does not match its checksum")
        if bf.sealed and not bf.truncated:
            self._check_footer(bf, scan)

    def _check_footer(self, bf: BlockFacts, scan: Scan) -> None:
        rep, bid, e = self.rep, bf.block_id, bf.entry
        data_end = e.data_end if e is not None else bf.scan_end
        f = bf.footer
        if f is None:
            tail = bf.size - data_end
            what = "missing" if tail <= 0 else ("torn" if tail < FOOTER_SIZE else
                                                "of a newer format version" if bf.footer_newer else "not valid")
            bf.footer_problem = f"footer is {what} ({tail} bytes after the data end {data_end})"
            rep.add("footer", bid, data_end, bf.footer_problem)
            return
        problems = []  # a data_end that differs from the block table's is the table's error: block-counts
        if not scan.damaged and not bf.bad_payloads:
            seqs = [r.info.seq for r in scan.records]
            if f.record_count != len(scan.records):
                problems.append(f"record_count {f.record_count}, {len(scan.records)} records in the block")
            if (f.min_seq, f.max_seq) != (min(seqs, default=0), max(seqs, default=0)):
                problems.append(f"seq range {f.min_seq}..{f.max_seq}, records {min(seqs, default=0)}.."
                                f"{max(seqs, default=0)}")
        if problems:
            bf.footer_problem = "footer disagrees: " + "; ".join(problems)
            rep.add("footer", bid, f.data_end, bf.footer_problem)

    def _named(self, bf: BlockFacts, fd: int, scan: Scan, committed: int) -> None:
        """Key entries naming this block against its records; records no entry names against their key's entry."""
        rep, bid = self.rep, bf.block_id
        by_off = {r.offset: r for r in scan.records}
        rev = [(off, bytes(sfx)) for off, sfx in self._reverse_of(bid)]
        locs = self._locs([s for _o, s in rev])
        named: dict[int, tuple[bytes, Location]] = {}
        values: dict[bytes, Location] = {}  # keys with copies: the whole value, for the findings
        for (off, sfx), loc in zip(rev, locs):
            if isinstance(loc, Location) and loc.holds(bid, off):
                # the primary, or one of the key's copies (docs/copies.md): checked against its record alike
                named[off] = (sfx, next(p for p in loc.places() if (p.block_id, p.offset) == (bid, off)))
                if loc.copies:
                    values[sfx] = loc
                continue
            if isinstance(loc, str):
                continue  # reported with the entry; the reverse entry goes with its repair
            where = "no entry" if loc is None else f"an entry naming {block_label(loc.block_id)}:{loc.offset}"
            rep.add("reverse", bid, off, f"reverse entry names {key_text(sfx)}, which has {where}")
            rep.bad_reverse.append(reverse_key(bid, off))
        for sfx, loc in self.unindexed.get(bid, []):
            named.setdefault(loc.offset, (sfx, loc))
        damaged_at = [(a, b) for a, b, _w in scan.damaged]
        for off, (sfx, place) in sorted(named.items()):
            bf.named += 1
            r = by_off.get(off)
            loc = values.get(sfx, place)  # a finding names the whole value: its repair tries every place
            if r is None:
                if bf.unsealed and off >= min(bf.valid_end, committed):
                    rep.dangling[sfx] = (loc, "names a record the seal cuts")
                    continue
                if any(a <= off < b for a, b in damaged_at) or off >= bf.scan_end:
                    rep.dangling[sfx] = (loc, "names a damaged record")
                    continue  # the record/truncated finding says it
                rep.dangling[sfx] = (loc, f"names offset {off}, where no record starts")
                rep.add("dangling", bid, off, f"entry of {key_text(sfx)} names offset {off}, where no record starts")
                continue
            why = self._disagreement(sfx, place, r)
            if why is None and r.payload_ok is False:
                rep.dangling[sfx] = (loc, "names a record whose payload is damaged")
                continue  # the payload finding says it
            if why is not None:
                rep.dangling[sfx] = (loc, why)
                kind = "namespace" if why.startswith("the record carries namespace") else "dangling"
                rep.add(kind, bid, off, f"entry of {key_text(sfx)} {why}")
        # records that no entry names: older versions (dead), copies, or newer than the directory knows
        unnamed = [r for r in scan.records if r.offset not in named]
        if bf.unsealed:  # what the seal cuts off is not judged: it goes to lost+found
            unnamed = [r for r in unnamed if r.offset < min(bf.valid_end, committed)]
        for i in range(0, len(unnamed), BATCH):
            chunk = unnamed[i : i + BATCH]
            sfxs = [record_suffix(r) for r in chunk]
            for r, sfx, loc in zip(chunk, sfxs, self._locs(sfxs)):
                nid = r.info.ns
                if nid not in rep.ns_ids:
                    self.unnamed_ns[nid] = self.unnamed_ns.get(nid, 0) + 1
                if r.info.kind == Kind.TOMBSTONE:
                    if r.info.seq > self.tomb_max.get(sfx, 0):
                        self.tomb_max[sfx] = r.info.seq
                if isinstance(loc, str):  # the key's entry does not decode: its repair wants the newest record
                    cur = self.broken.get(sfx)
                    if r.info.kind != Kind.TOMBSTONE and r.payload_ok and (cur is None or r.info.seq > cur[0]):
                        self.broken[sfx] = (r.info.seq, bid, r.offset)
                    continue
                if loc is None:
                    if r.info.kind != Kind.TOMBSTONE and r.payload_ok:
                        self._newest(Unreferenced(sfx, bid, r.offset, r.info.seq, r.info.kind, None))
                    continue
                if r.info.seq == loc.seq and r.info.kind != Kind.TOMBSTONE and r.payload_ok:
                    rep.copies.setdefault(sfx, (bid, r.offset))  # a relocated record's source (or copy)
                elif r.info.seq > loc.seq:
                    self._newest(Unreferenced(sfx, bid, r.offset, r.info.seq, r.info.kind, loc))

    def _reverse_of(self, bid: int) -> Iterator[tuple[int, bytes]]:
        prefix = reverse_prefix(bid)
        for k, v in self._iter(prefix):
            if len(k) == 17:
                yield int.from_bytes(k[9:17], "big"), bytes(v)

    def _newest(self, u: Unreferenced) -> None:
        cur = self.newest_unnamed.get(u.suffix)
        if cur is None or u.seq > cur.seq:
            self.newest_unnamed[u.suffix] = u

    @staticmethod
    def _disagreement(sfx: bytes, loc: Location, r: ScannedRecord) -> str | None:
        if r.info.kind == Kind.TOMBSTONE:
            return f"names a tombstone (seq {r.info.seq})"
        got = record_suffix(r)
        if got[4:] == sfx[4:] and got[:4] != sfx[:4]:
            return f"the record carries namespace {r.info.ns}, not {suffix_ns_id(sfx)}"
        if got != sfx:
            return f"names a record of {key_text(got)}"
        want = location_of(r, loc.block_id)
        diffs = [name for name in ("kind", "flags", "payload_off", "record_len", "payload_len", "seq",
                                   "payload_xxh3", "meta") if getattr(loc, name) != getattr(want, name)]
        if diffs:
            shown = "; ".join(f"{n} {getattr(loc, n)!r:.40} vs {getattr(want, n)!r:.40}" for n in diffs)
            return f"disagrees with the record it names: {shown}"
        return None

    def _counts(self, bf: BlockFacts, scan: Scan) -> None:
        """The block table entry as the file and the key entries say it should be."""
        e = bf.entry
        if e is None or bf.unsealed or bf.needs_evacuation or bf.header_problem:
            return
        live_open = e.state == BLOCK_OPEN and self.writer is not None
        sums = self.named_sums.get(bf.block_id, [0, 0, 0])
        d = e.copy()
        d.written_bytes, d.total_records = bf.written, bf.records
        d.data_end = scan.records[-1].offset + scan.records[-1].info.record_len if scan.records else BLOCK_HEADER_SIZE
        if live_open:
            d.data_end = e.data_end
        d.live_records, d.live_bytes, d.live_logical_bytes = sums
        d.tombstones = min(e.tombstones, bf.tombstones)
        diffs = [n for n in ("written_bytes", "total_records", "data_end", "live_records", "live_bytes",
                             "live_logical_bytes", "tombstones") if getattr(d, n) != getattr(e, n)]
        if diffs:
            shown = ", ".join(f"{n} {getattr(e, n)} (should be {getattr(d, n)})" for n in diffs)
            self.rep.add("block-counts", bf.block_id, None, f"block table says {shown}")
        bf.derived = d
