"""Directory-side checks of a pass: counters and namespaces, the block table, every key entry (decodes,
names a block that exists, has its reverse and listing entries), the listing and reverse indexes, and
whether the directory lost writes."""

from __future__ import annotations

import errno
import os
import struct

from blockstore.directory import BLOCK_RECLAIMING, LOCATION_VERSION, Directory, Location
from blockstore.errors import BlockstoreError, IOErrorBS
from blockstore.keys import (
    SPACE_CHUNK,
    TAG_BLOCK,
    TAG_KEY,
    TAG_NS,
    TAG_NS_ID,
    TAG_REVERSE,
    TAG_SESSION,
    chunk_session_key,
    meta_key,
    parse_session_key,
    reverse_key,
    suffix_ns_id,
)
from blockstore.records import FORMAT_VERSION, Kind
from blockstore.seqfloor import MIN_SEQ_PREFIX, min_seq_block
from blockstore.store import DIRECTORY
from blockstore.tools.fsck_decode import (
    BLOCK_ENTRY_VERSION,
    DirectoryUnreadable,
    block_label,
    decode_block_entry,
    decode_location,
    is_newer_value,
    key_text,
    suffix_space_ok,
)
from blockstore.tools.fsck_pass import BATCH, PassBase
from blockstore.tools.fsck_report import Unreferenced

_META_NAMES = ("next_seq", "next_block", "next_ns", "bytes_put", "bytes_written", "clean", "format_version")


class DirectoryChecks(PassBase):
    """The directory side of a pass (run by fsck._Pass.run, before the blocks are read)."""

    def _open_directory(self) -> None:
        if self.dir is not None:
            self.rep.directory_ok = True
            return
        p = os.path.join(self.root, DIRECTORY)
        if not os.path.isdir(p):
            self.rep.add("directory", None, None, f"the directory ({DIRECTORY}/) is missing")
            return
        try:
            self.dir = Directory(p, read_only=True, sync=False, create=False)
        except BlockstoreError as exc:
            if isinstance(exc, IOErrorBS) and exc.errno == errno.EACCES:
                raise  # an operational error (exit 8), not a directory to rebuild
            self.rep.add("directory", None, None, f"the directory ({DIRECTORY}/) cannot be opened: {exc}")
            return
        self.rep.directory_ok = True

    def _directory_owner(self) -> int | None:
        """The store the directory says it belongs to (`M store_id`); None if it does not say or cannot be read
        (the pass then finds out why)."""
        if self.dir is None:
            return None
        try:
            raw = self._mget([meta_key("store_id")])[0]
        except (BlockstoreError, DirectoryUnreadable):
            return None
        return struct.unpack("<Q", raw)[0] if raw is not None and len(raw) == 8 else None

    def _foreign_directory(self, owner: int | None) -> None:
        """A directory whose `M store_id` names another store than the MANIFEST and the block headers: another
        store's directory put here. None of it is this store's, so none of it is judged (or salvaged)."""
        if self.dir is not None and owner is not None and self.rep.store_id is not None and owner != self.rep.store_id:
            self._directory_failed(f"the directory ({DIRECTORY}/) is another store's (store {owner}, this store is "
                                   f"{self.rep.store_id}): repair moves it to lost+found and rebuilds it from the blocks")
            self.rep.foreign_directory = True

    def _directory_failed(self, why: str) -> None:
        rep = self.rep
        # what was learned from the directory cannot be trusted: keep only the file-level findings
        rep.findings = [f for f in rep.findings if f.kind == "manifest"]
        rep.add("directory", None, None, why)
        rep.directory_ok = False
        if self.own_dir and self.dir is not None:
            self.dir.close()
        self.dir = None
        self.entries, self.reclaiming = {}, {}
        rep.reclaiming.clear()
        rep.lost_writes = False
        self.unindexed, self.named_sums, self.missing_named, self.nowhere_named = {}, {}, {}, {}
        self.tomb_max, self.newest_unnamed, self.broken = {}, {}, {}
        for name in ("dangling", "copies", "broken_newest", "bad_keys", "bad_reverse", "missing_reverse",
                     "bad_session", "missing_session", "bad_block_values", "bad_block_keys", "unreferenced",
                     "bad_counters"):
            getattr(rep, name).clear()
        rep.blocks.clear()

    def _load_small(self) -> None:
        rep = self.rep
        for name in _META_NAMES:
            raw = self._mget([meta_key(name)])[0]
            rep.meta[name] = None if raw is None or len(raw) != 8 else struct.unpack("<Q", raw)[0]
            if raw is not None and len(raw) != 8:
                rep.bad_counters.append(name)
        for k, v in self._iter(meta_key(MIN_SEQ_PREFIX)):  # eviction's floor counters (seqfloor.py)
            if len(v) != 8:
                rep.bad_counters.append(bytes(k[1:]).decode("ascii", "replace"))
        for k, v in self._iter(TAG_NS):
            name_ok = True
            try:
                name = bytes(k[1:]).decode()
            except UnicodeDecodeError:
                name_ok = False
            if not name_ok or len(v) != 4:
                rep.add("namespace", None, None, f"namespace name entry {bytes(k[1:])!r} does not decode")
                continue
            rep.ns_names[name] = int.from_bytes(v, "little")
        for k, v in self._iter(TAG_NS_ID):
            if len(k) != 5:
                rep.add("namespace", None, None, f"namespace id entry {bytes(k).hex()} is malformed")
                continue
            rep.ns_ids[int.from_bytes(k[1:5], "big")] = bytes(v)
        for k, v in self._iter(TAG_BLOCK):
            if len(k) != 9:
                rep.add("block-entry", None, None, f"block table key {bytes(k).hex()} is malformed")
                rep.bad_block_keys.append(bytes(k))
                continue
            bid = int.from_bytes(k[1:9], "big")
            e = decode_block_entry(bid, bytes(v))
            if isinstance(e, str):
                rep.newer_format |= is_newer_value(bytes(v), BLOCK_ENTRY_VERSION)  # then repair refuses
                rep.add("block-entry", bid, None, f"block table entry does not decode: {e}")
                rep.bad_block_values.append(bid)
                continue
            if e.state == BLOCK_RECLAIMING:  # being deleted on durable proof; file there or not: normal
                self.reclaiming[bid] = rep.reclaiming[bid] = e
                continue
            self.entries[bid] = e

    def _key_stream(self) -> None:
        """Every key entry: decodes, names a block that exists, has its reverse and listing entries."""
        batch: list[tuple[bytes, bytes]] = []
        for k, v in self._iter(TAG_KEY):
            batch.append((bytes(k), bytes(v)))
            if len(batch) >= BATCH:
                self._key_batch(batch)
                batch = []
        if batch:
            self._key_batch(batch)

    def _key_batch(self, batch: list[tuple[bytes, bytes]]) -> None:
        rep = self.rep
        good: list[tuple[bytes, Location]] = []
        for k, v in batch:
            suffix = k[1:]
            self.keys += 1
            if not suffix_space_ok(suffix):
                rep.add("dangling", None, None, f"directory key {k[:60].hex()} is not a key entry")
                rep.bad_keys.append(k)
                continue
            loc = decode_location(v)
            if isinstance(loc, str):
                rep.newer_format |= is_newer_value(v, LOCATION_VERSION)  # then repair refuses
                rep.add("dangling", None, None, f"entry of {key_text(suffix)} does not decode: {loc}")
                rep.dangling[suffix] = (None, loc)
                continue
            rep.ns_used.add(suffix_ns_id(suffix))
            good.append((suffix, loc))
        # one check per place: a key with copies (docs/copies.md) names a record in each of their blocks
        placed = [(s, loc, place) for s, loc in good for place in loc.places()]
        rkeys = self._mget([reverse_key(place.block_id, place.offset) for _s, _loc, place in placed])
        chunk_idx = [(i, chunk_session_key(s, loc)) for i, (s, loc) in enumerate(good) if s[4] == SPACE_CHUNK]
        skeys = [sk for _i, sk in chunk_idx if sk is not None]
        sfound = dict(zip(skeys, self._mget(skeys)))
        for i, sk in chunk_idx:
            suffix, loc = good[i]
            if sk is None:
                rep.add("session-index", loc.block_id, loc.offset,
                        f"{key_text(suffix)}: its meta has no timestamp, so it cannot be listed")
            elif sfound.get(sk) is None:
                rep.add("session-index", loc.block_id, loc.offset, f"{key_text(suffix)} has no listing entry")
                rep.missing_session.append((sk, suffix))
        damaged = set(rep.bad_block_values)
        for (suffix, value, loc), r in zip(placed, rkeys):
            bid = loc.block_id
            if bid in damaged and bid not in self.files:
                # no file and an entry that does not decode: it may be a block whose local copy was dropped
                # (the flag went with the entry), its records in an object: not dangling, nothing dropped
                continue
            if bid not in self.entries and bid not in self.files and bid not in self.reclaiming:
                self.nowhere_named[bid] = self.nowhere_named.get(bid, 0) + 1
                rep.dangling[suffix] = (value, f"names block {block_label(bid)}, which does not exist")
                rep.add("dangling", bid, loc.offset,
                        f"entry of {key_text(suffix)} names block {block_label(bid)}, which does not exist")
                continue
            if bid not in self.files and bid in self.entries and self.entries[bid].remote_name:
                continue  # its local copy was dropped once its object was confirmed: reads fetch from there
            if bid not in self.files:
                self.missing_named[bid] = self.missing_named.get(bid, 0) + 1
                rep.dangling[suffix] = (value, f"names block {block_label(bid)}, whose file is missing")
                continue  # one missing-block finding per block says it
            sums = self.named_sums.setdefault(bid, [0, 0, 0])
            sums[0] += 1
            sums[1] += loc.record_len
            if (loc.block_id, loc.offset) == (value.block_id, value.offset):  # a key's bytes count once, with
                sums[2] += len(suffix) - 5 + loc.payload_len  # its primary (docs/copies.md)
            if r is None or bytes(r) != suffix:
                rep.add("reverse", bid, loc.offset, f"entry of {key_text(suffix)} has no reverse entry")
                rep.missing_reverse.append((suffix, loc))
                self.unindexed.setdefault(bid, []).append((suffix, loc))

    def _session_stream(self) -> None:
        rep = self.rep
        batch: list[tuple[bytes, bytes, int]] = []

        def flush() -> None:
            locs = self._locs([s for _k, s, _t in batch])
            for (k, s, ts), loc in zip(batch, locs):
                if not isinstance(loc, Location) or loc.kind != Kind.CHUNK:
                    why = "no chunk entry" if loc is None else "an entry that is not a chunk's"
                    rep.add("session-index", None, None, f"listing entry for {key_text(s)} has {why}")
                    rep.bad_session.append(k)
                elif chunk_session_key(s, loc) != k:
                    rep.add("session-index", loc.block_id, loc.offset,
                            f"listing entry for {key_text(s)} has timestamp {ts}, its chunk another")
                    rep.bad_session.append(k)
            batch.clear()

        for k, _v in self._iter(TAG_SESSION):
            k = bytes(k)
            parsed = parse_session_key(k)
            if parsed is None:
                rep.add("session-index", None, None, f"listing entry {k[:60].hex()} does not parse")
                rep.bad_session.append(k)
                continue
            batch.append((k, parsed[0], parsed[1]))
            if len(batch) >= BATCH:
                flush()
        if batch:
            flush()

    def _reverse_stream(self) -> None:
        """Reverse entries of blocks that do not exist (the others are checked block by block)."""
        rep = self.rep
        stray: dict[int, int] = {}
        for k, _v in self._iter(TAG_REVERSE):
            if len(k) != 17:
                rep.add("reverse", None, None, f"reverse key {bytes(k).hex()} is malformed")
                rep.bad_reverse.append(bytes(k))
                continue
            bid = int.from_bytes(k[1:9], "big")
            if bid not in self.entries and bid not in self.files and bid not in self.reclaiming:
                stray[bid] = stray.get(bid, 0) + 1
                rep.bad_reverse.append(bytes(k))
        for bid, n in sorted(stray.items()):
            rep.add("reverse", bid, None, f"{n} reverse entries name block {block_label(bid)}, which does not exist")

    def _lost_writes(self) -> None:
        """Blocks are named in the directory (synced) before their files are created, and their entries
        go only after their files: a file of this store holding records that the directory does not name
        means the directory lost writes (a lost or truncated WAL, an old copy of it put back). It reads
        in full, but it is not the truth: repair rebuilds it from the blocks."""
        rep = self.rep
        lost = [bf for bf in rep.blocks.values() if bf.orphan_records]
        if not lost:
            return
        rep.lost_writes = True
        shown = ", ".join(block_label(bf.block_id) for bf in lost[:8]) + (", ..." if len(lost) > 8 else "")
        rep.add("directory", None, None,
                f"the directory ({DIRECTORY}/) lost writes: it does not name {len(lost)} block files of this store "
                f"that hold {sum(bf.orphan_records for bf in lost)} records that verify ({shown}); it is rebuilt "
                "from the block files")

    def _resolve_unreferenced(self) -> None:
        rep = self.rep
        for sfx, (seq, bid, off) in self.broken.items():
            if self.tomb_max.get(sfx, 0) < seq:
                rep.broken_newest[sfx] = (bid, off)
        for sfx, u in sorted(self.newest_unnamed.items(), key=lambda kv: (kv[1].block_id, kv[1].offset)):
            if sfx in rep.dangling:
                continue  # the entry is broken: its repair decides
            if u.entry is None and self.tomb_max.get(sfx, 0) > u.seq:
                continue  # deleted since: the tombstone wins a rebuild
            if u.entry is None:
                why = (f"{Kind(u.kind).name.lower()} record seq {u.seq} of {key_text(sfx)} is its key's newest on "
                       "disk, but the directory has no entry for it")
            else:
                why = (f"{Kind(u.kind).name.lower()} record seq {u.seq} of {key_text(sfx)} is newer than the "
                       f"directory's entry (seq {u.entry.seq} at {block_label(u.entry.block_id)}:{u.entry.offset})")
            rep.add("unreferenced", u.block_id, u.offset, why)
            rep.unreferenced.append(u)
        # tombstones newer than a live entry
        seen = {u.suffix for u in rep.unreferenced}
        entries = list(self.tomb_max.items())
        for i in range(0, len(entries), BATCH):
            chunk = entries[i : i + BATCH]
            for (sfx, seq), loc in zip(chunk, self._locs([s for s, _q in chunk])):
                if isinstance(loc, Location) and seq > loc.seq and sfx not in rep.dangling and sfx not in seen:
                    rep.add("unreferenced", loc.block_id, loc.offset,
                            f"a tombstone seq {seq} of {key_text(sfx)} is newer than its entry (seq {loc.seq})")
                    rep.unreferenced.append(Unreferenced(sfx, loc.block_id, loc.offset, seq, Kind.TOMBSTONE, loc))

    def _namespaces(self) -> None:
        rep = self.rep
        for name, nid in sorted(rep.ns_names.items()):
            back = rep.ns_ids.get(nid)
            if back is None:
                rep.add("namespace", None, None, f"namespace {name!r} (id {nid}) has no id entry")
            elif back != name.encode():
                rep.add("namespace", None, None, f"namespace {name!r} has id {nid}, whose id entry names {back!r}")
        named_ids = set(rep.ns_names.values())
        for nid, raw in sorted(rep.ns_ids.items()):
            if nid not in named_ids:
                rep.add("namespace", None, None, f"namespace id {nid} names {raw!r}, which has no name entry")
        if len(named_ids) != len(rep.ns_names):
            rep.add("namespace", None, None, "two namespace names share one id")
        for nid in sorted(rep.ns_used - named_ids - set(rep.ns_ids)):
            rep.add("namespace", None, None, f"key entries use namespace id {nid}, which has no name")
        for nid, n in sorted(self.unnamed_ns.items()):
            if nid not in named_ids and nid not in rep.ns_used:
                rep.add("namespace", None, None, f"{n} records of namespace id {nid}, which has no name")
        rep.max_ns = max([0, *rep.ns_names.values(), *rep.ns_ids, *rep.ns_used, *self.unnamed_ns])

    def _counters(self) -> None:
        rep, meta = self.rep, self.rep.meta
        for name in _META_NAMES:
            if meta.get(name) is None:
                rep.add("directory-version" if name == "format_version" else "counter", None, None,
                        f"store counter {name} is " + ("damaged (not 8 bytes)" if name in rep.bad_counters else "missing"))
        for name in rep.bad_counters:
            if name not in _META_NAMES:
                rep.add("counter", min_seq_block(name), None, f"store counter {name} is damaged (not 8 bytes): "
                        "eviction refuses every block while this block's file is missing; repair drops it")
        v = meta.get("format_version")
        if v is not None and v > FORMAT_VERSION:
            rep.newer_format = True
            rep.add("directory-version", None, None, f"directory format version {v} is newer than this build "
                    f"({FORMAT_VERSION})")
        checks = [("next_seq", rep.max_seq, "the highest sequence number on disk"),
                  ("next_block", rep.max_block, "the highest block id"),
                  ("next_ns", rep.max_ns, "the highest namespace id")]
        for name, top, what in checks:
            got = meta.get(name)
            if got is not None and got <= top:
                rep.add("counter", None, None, f"{name} is {got}, not above {what} ({top})")
        if meta.get("clean") not in (None, 1) and self.writer is None:
            rep.add("unclean", None, None, "the last writer did not close the store (clean = 0); the next "
                    "writer runs recovery")
        if self.writer is not None:
            rep.notes.append(f"a writer (pid {self.writer or 'unknown'}) holds the store: blocks open in the "
                             "directory snapshot were checked up to their committed end; its unclean flag and "
                             "files created since the snapshot were not judged")
