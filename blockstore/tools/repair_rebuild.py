"""A directory rebuilt from the block files alone, for a directory that cannot be read or lost writes."""

from __future__ import annotations

import os
import time

import xxhash

from blockstore.blocks import BLOCKS_DIR, block_file_name, block_id_of
from blockstore.directory import BLOCK_OPEN, BLOCK_RECLAIMING, BLOCK_SEALED, BlockEntry, Directory, DirectoryBatch
from blockstore.errors import BlockstoreError, FormatVersionError
from blockstore.keys import (
    SPACE_CHUNK,
    TAG_AFFINITY,
    TAG_BLOCK,
    TAG_META,
    TAG_NS,
    TAG_NS_ID,
    chunk_session_key,
    decode_chunk_key,
    encode_chunk_key,
    namespace_id_key,
    namespace_key,
)
from blockstore.placement_choice import large_lineage, parent_of
from blockstore.records import BLOCK_HEADER_SIZE, FORMAT_VERSION, BlockHeader, Footer, Kind, ScannedRecord
from blockstore.tools.fsck_decode import decode_block_entry, location_of, record_suffix
from blockstore.tools.fsck_scan import scan_records
from blockstore.tools.repair_base import RECOVERED_PARTITION, RepairBase, block_files, unused_name


def _old_entry(bid: int, raw: bytes | None) -> BlockEntry | None:
    """A block-table entry salvaged from the old directory, if it decodes."""
    if raw is None:
        return None
    try:
        e = decode_block_entry(bid, raw)
    except BlockstoreError:
        return None
    return e if isinstance(e, BlockEntry) else None


def dropped_blocks(root: str, salvaged: dict[bytes, bytes]) -> list[int]:
    """Blocks the salvaged directory flags remote whose local file is gone (the remote tier dropped it)."""
    out = []
    for k, v in salvaged.items():
        if k[:1] == TAG_BLOCK and len(k) == 9:
            e = _old_entry(int.from_bytes(k[1:9], "big"), v)
            if e is not None and e.remote_name and e.state == BLOCK_SEALED and \
                    not os.path.exists(os.path.join(root, BLOCKS_DIR, block_file_name(e.block_id))):
                out.append(e.block_id)
    return sorted(out)


class Rebuild:
    """A directory from the block files alone: newest record of each key wins (docs/format.md §2.2:
    relocated copies keep their sequence number), a tombstone means absent, and so does a newest
    record whose payload does not verify (an older version must not come back in its place)."""

    def __init__(self, r: RepairBase, d: Directory, salvaged: dict[bytes, bytes]) -> None:
        self.r = r
        self.d = d
        self.salvaged = salvaged
        self.named: dict[int, tuple[str, str]] = {}  # namespace id -> (name, how it was found)
        self.newest: dict[bytes, tuple[int, int, int, ScannedRecord]] = {}  # suffix -> (seq, block, off, record)
        self.blocks: dict[int, BlockEntry] = {}
        self.phash: dict[int, tuple[int, set[int], bytes | None]] = {}  # block -> (partition hash, ns ids, chunk prefix)
        self.max_seq = 0

    def run(self) -> int:
        """Write the directory; returns the number of key entries written."""
        old_blocks = {int.from_bytes(k[1:9], "big"): v for k, v in self.salvaged.items()
                      if k[:1] == TAG_BLOCK and len(k) == 9}
        for path in block_files(self.r.root):
            bid = block_id_of(os.path.basename(path))
            if bid is None:
                continue
            old = _old_entry(bid, old_blocks.get(bid))
            if old is not None and old.state == BLOCK_RECLAIMING:
                # being deleted on durable proof (its live records were moved, or all died): its records
                # must not count, and the engine's next open finishes the deletion
                self.blocks[bid] = old
                continue
            read = self._read_block(path, bid)
            if read is not None:
                self._add_block(bid, old, *read)
        return self._write()

    def _read_block(self, path: str, bid: int) -> tuple[BlockHeader | None, Footer | None, list[ScannedRecord]] | None:
        """The block's header and footer where they verify, and its records; None when its verified
        header says it is not this store's block `bid` (the next check moves it to lost+found)."""
        be = self.r.be
        fd = be.open_ro(path)
        try:
            size = be.size(fd)
            header = None
            try:
                header = be.decode_block_header(be.pread(fd, 64, 0))
            except FormatVersionError:
                raise
            except BlockstoreError:
                pass
            if header is not None and (header.store_id != self.r.store_id or header.block_id != bid):
                return None
            footer = None
            if size >= BLOCK_HEADER_SIZE + 64:
                try:
                    f = be.decode_footer(be.pread(fd, 64, size - 64))
                    footer = f if f.data_end == size - 64 and f.block_id == bid else None
                except BlockstoreError:
                    footer = None
            end = footer.data_end if footer is not None else size
            scan = scan_records(be, fd, BLOCK_HEADER_SIZE, end) if end > BLOCK_HEADER_SIZE else None
        finally:
            be.close(fd)
        return header, footer, scan.records if scan else []

    def _add_block(self, bid: int, old: BlockEntry | None, header: BlockHeader | None, footer: Footer | None,
                   recs: list[ScannedRecord]) -> None:
        """The block's table entry, and its records as candidates for their keys' newest."""
        if footer is None:  # no footer: an unsealed block; only its leading run of valid records counts
            valid_end, kept = BLOCK_HEADER_SIZE, []
            for rec in recs:
                if rec.offset != valid_end or not rec.payload_ok:
                    break
                kept.append(rec)
                valid_end = rec.offset + rec.info.record_len
            recs, data_end = kept, valid_end
        else:
            data_end = footer.data_end
        now = time.time_ns()
        self.blocks[bid] = BlockEntry(
            bid, BLOCK_SEALED if footer is not None else BLOCK_OPEN,
            old.partition if old is not None else RECOVERED_PARTITION,
            written_bytes=sum(x.info.record_len for x in recs), total_records=len(recs),
            tombstones=sum(1 for x in recs if x.info.kind == Kind.TOMBSTONE), data_end=data_end,
            created_ns=header.created_ns if header else now, last_append_ns=now,
            sealed_ns=now if footer is not None else 0)
        prefix = None
        newest = self.newest
        for x in recs:
            self.max_seq = max(self.max_seq, x.info.seq)
            sfx = record_suffix(x)
            cur = newest.get(sfx)
            if cur is None or x.info.seq > cur[0] or (x.info.seq == cur[0] and x.payload_ok and
                                                       not cur[3].payload_ok):
                newest[sfx] = (x.info.seq, bid, x.offset, x)
            if x.info.kind == Kind.CHUNK and prefix is None:
                prefix = sfx[5:]
        if header is not None:
            self.phash[bid] = (header.partition_hash, {x.info.ns for x in recs}, prefix)

    def _write(self) -> int:
        """The key entries (the newest record of each key, unless a tombstone or damaged), listing and
        block-table entries, namespaces, what was salvaged, and the counters, in synced batches."""
        blocks, max_seq = self.blocks, self.max_seq
        batch = DirectoryBatch()
        n = 0
        ns_used: set[int] = set()
        for sfx, (_seq, bid, _off, x) in self.newest.items():
            ns_used.add(x.info.ns)
            if x.info.kind == Kind.TOMBSTONE or not x.payload_ok:
                continue
            loc = location_of(x, bid)
            batch.put_location(sfx, loc)
            if sfx[4] == SPACE_CHUNK:
                sk = chunk_session_key(sfx, loc)
                if sk is not None:
                    batch.put(sk, b"")
            e = blocks[bid]
            e.live_records += 1
            e.live_bytes += x.info.record_len
            e.live_logical_bytes += x.info.key_len + x.info.payload_len
            n += 1
            if n % 10_000 == 0:
                self.d.write(batch)
                batch = DirectoryBatch()
        for e in blocks.values():
            batch.put_block(e)
        names = self._names(ns_used, self.phash)
        for nid, name in names.items():
            batch.put(namespace_key(name), nid.to_bytes(4, "little"))
            batch.put(namespace_id_key(nid), name.encode())
        for k, v in self.salvaged.items():
            if k[:1] == TAG_AFFINITY:
                batch.put(k, v)  # co-access hints: harmless if stale (versioned, skipped when unknown)
        old_meta = {k[1:].decode(errors="replace"): int.from_bytes(v[:8], "little")
                    for k, v in self.salvaged.items() if k[:1] == TAG_META and len(v) == 8}
        batch.put_meta("next_seq", max(max_seq + 1, old_meta.get("next_seq", 0)))
        batch.put_meta("next_block", max(max(blocks, default=0) + 1, old_meta.get("next_block", 0)))
        batch.put_meta("next_ns", max(max(names, default=0) + 1, old_meta.get("next_ns", 0)))
        batch.put_meta("bytes_put", old_meta.get("bytes_put", sum(e.live_logical_bytes for e in blocks.values())))
        batch.put_meta("bytes_written", old_meta.get("bytes_written", sum(e.written_bytes for e in blocks.values())))
        batch.put_meta("clean", 0)
        batch.put_meta("format_version", FORMAT_VERSION)
        if self.r.store_id is not None:
            batch.put_meta("store_id", self.r.store_id)
        self.d.write(batch, force_sync=True)
        return n

    def _names(self, used: set[int], phash: dict[int, tuple[int, set[int], bytes | None]]) -> dict[int, str]:
        """A name for every namespace id in use: salvaged, else given (namespace_ids), else a candidate whose
        partition hash some block of that namespace alone carries, else recovered-ns-<id>."""
        names: dict[int, str] = {}
        how: dict[int, str] = {}
        for k, v in self.salvaged.items():
            if k[:1] == TAG_NS_ID and len(k) == 5:
                try:
                    names[int.from_bytes(k[1:5], "big")] = v.decode()
                except UnicodeDecodeError:
                    pass
        for k, v in self.salvaged.items():
            if k[:1] == TAG_NS and len(v) == 4:
                try:
                    names.setdefault(int.from_bytes(v, "little"), k[1:].decode())
                except UnicodeDecodeError:
                    pass
        how.update({nid: "salvaged" for nid in names})
        for nid, name in self.r.known_names.items():
            if nid not in names and name not in names.values():
                names[nid] = name
                how[nid] = "given"
        for cand in self.r.candidates:
            if cand in names.values():
                continue
            raw = cand.encode()
            for h, ids, prefix in phash.values():
                if len(ids) != 1:
                    continue
                (nid,) = ids
                if nid in names:
                    continue
                hashes = {xxhash.xxh3_64_intdigest(raw), xxhash.xxh3_64_intdigest(large_lineage(raw))}
                if prefix is not None:
                    u, s, _c = decode_chunk_key(prefix)
                    session = raw + b"\0u" + encode_chunk_key(u, s, b"")
                    # the session's partition, or its user's where placement put the user's sessions together
                    hashes |= {xxhash.xxh3_64_intdigest(p) for p in (session, parent_of(session)) if p is not None}
                if h in hashes:
                    names[nid] = cand
                    how[nid] = "matched by partition hash"
                    break
        taken = {name: nid for nid, name in names.items()}
        for nid in sorted(used):
            if nid not in names:
                names[nid] = unused_name(f"recovered-ns-{nid}", taken)
                taken[names[nid]] = nid
                how[nid] = "name lost"
        self.named = {nid: (name, how.get(nid, "")) for nid, name in names.items()}
        return names
