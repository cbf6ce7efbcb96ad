"""fsck --repair: make the store consistent again, keeping what can be kept and moving the rest to
STORE/lost+found/ instead of deleting it (docs/fsck.md lists what is done for each finding kind).

It needs the writer lock (a store in use is refused, StoreLocked). Then it alternates checking and
fixing, one phase at a time, until a check finds nothing or a phase can change nothing more:

0. store level: a MANIFEST that cannot be trusted is rewritten; block files whose verified headers
   name another block are renamed to their own names; a directory that cannot be read, or that lost
   writes (it does not name block files of this store that hold records), is moved to lost+found and
   rebuilt from the block files;
1. files: foreign and orphan block files go to lost+found; damaged block headers and footers are
   rewritten; blocks a crashed writer left open are sealed (their torn tails saved); blocks with
   damaged records are evacuated (verified records copied to a new block, keeping their sequence
   numbers, a record with a damaged header too when its key entry's payload checksum verifies; the
   file moved to lost+found); the entries of blocks whose file is missing are dropped;
2. directory: key entries are re-derived, re-pointed or dropped; reverse and listing entries made to
   mirror the key entries; block-table entries re-created; namespace ids made to mirror names;
3. counters: block-table counters re-derived, store counters raised above what is on disk;
4. records newer than the directory: superseded, so that reads keep returning what they returned;
5. the store is marked clean (every block file synced first).

What reads return is kept, except that a record that cannot be read back verified becomes a miss:
repair never makes visible a record the directory did not name (only a rebuild of a lost directory
does: there is nothing else to go by). Every write is durable before the next step relies on it
(new blocks synced before the directory names them; directory batches synced before a file they
stop naming is moved), so a crash during repair leaves a store that recovery or another repair handles.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from blockstore.backend import Backend, get_backend
from blockstore.blocks import BLOCKS_DIR, block_file_name
from blockstore.directory import (
    BLOCK_OPEN,
    BLOCK_RECLAIMING,
    BLOCK_SEALED,
    SPACE_CHUNK,
    SPACE_KV,
    TAG_AFFINITY,
    TAG_BLOCK,
    TAG_META,
    TAG_NS,
    TAG_NS_ID,
    TAG_REVERSE,
    TOMBSTONE_META,
    BlockEntry,
    Directory,
    DirectoryBatch,
    Location,
    block_key,
    location_key,
    reverse_key,
    salvage,
)
from blockstore.errors import BlockstoreError, FormatVersionError
from blockstore.fsck import (
    LOST_FOUND,
    BlockFacts,
    Finding,
    Report,
    block_label,
    check,
    chunk_session_key,
    decode_block_entry,
    decode_location,
    key_text,
    location_of,
    record_at,
    record_suffix,
    require_store,
    scan_records,
)
from blockstore.lock import WriterLock
from blockstore.records import (
    BLOCK_HEADER_SIZE,
    FORMAT_VERSION,
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
from blockstore.store import _MAX_BLOCK, _MIN_BLOCK, DEFAULT_BLOCK_SIZE, DIRECTORY, MANIFEST, write_manifest_file

REPAIR_PARTITION = b"\0fsck/repair"  # the stream of blocks repair writes (copies, tombstones)
RECOVERED_PARTITION = b"\0fsck/recovered"  # the partition of a block-table entry re-created from its file
_MAX_ROUNDS = 16
_LOG = "fsck-log.jsonl"
RENAMING = ".fsck-renaming"  # a block file on its way to the name its header gives (blocks/ID.blk.fsck-renaming)

# short words for "[corrected: ...]" where no block-specific action was recorded
_DONE = {
    "manifest": "MANIFEST rewritten", "directory": "directory rebuilt from the blocks",
    "directory-version": "format_version set", "unclean": "blocks synced, store marked clean",
    "counter": "counter raised", "namespace": "namespace index rewritten", "block-header": "header rewritten",
    "footer": "footer rewritten", "record": "block evacuated", "payload": "block evacuated",
    "truncated": "block evacuated", "unsealed": "block sealed", "missing-block": "entries dropped",
    "orphan-block": "moved to lost+found", "misnamed-block": "renamed", "block-entry": "entry re-derived", "block-counts": "counters re-derived",
    "dangling": "entry fixed", "reverse": "reverse index fixed", "session-index": "listing fixed",
    "unreferenced": "superseded",
}


@dataclass
class RepairResult:
    findings: list[Finding]  # everything found, in the order found, each marked corrected or not
    final: Report  # the last check
    lost_found: list[str] = field(default_factory=list)  # paths written under lost+found/
    refused: str | None = None  # why nothing was repaired at all

    @property
    def corrected(self) -> int:
        return sum(1 for f in self.findings if f.corrected)

    @property
    def uncorrected(self) -> int:
        return sum(1 for f in self.findings if not f.corrected)


class LostFound:
    """STORE/lost+found/: files moved or saved there, each noted in fsck-log.jsonl with why."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.dir = os.path.join(root, LOST_FOUND)
        self.written: list[str] = []

    def _target(self, name: str) -> str:
        os.makedirs(self.dir, exist_ok=True)
        path, n = os.path.join(self.dir, name), 0
        while os.path.lexists(path):
            n += 1
            path = os.path.join(self.dir, f"{name}.{n}")
        return path

    def move(self, src: str, name: str, why: str, **info: Any) -> str:
        dst = self._target(name)
        os.rename(src, dst)
        _fsync_dir(os.path.dirname(src))
        _fsync_dir(self.dir)
        self._note(dst, why, {"from": os.path.relpath(src, self.root), **info})
        return dst

    def save(self, name: str, data: bytes, why: str, **info: Any) -> str:
        dst = self._target(name)
        with open(dst, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.dir)
        self._note(dst, why, info)
        return dst

    def _note(self, path: str, why: str, info: dict[str, Any]) -> None:
        self.written.append(path)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "file": os.path.basename(path),
                 "why": why, **info}
        with open(os.path.join(self.dir, _LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair(path: str | os.PathLike[str], *, backend: Backend | None = None, namespaces: Sequence[str] = (),
           progress: Callable[[int, int], None] | None = None) -> RepairResult:
    """Repair the store at `path` (see the module docstring). `namespaces`: names to try for namespace
    ids whose names are lost with the directory. Raises StoreLocked if a writer holds the store."""
    root = require_store(path)
    lock = WriterLock(root)
    lock.acquire(root)
    try:
        return _Repairer(root, backend or get_backend(), list(namespaces), progress).run()
    finally:
        lock.release()


class _Repairer:
    def __init__(self, root: str, backend: Backend, namespaces: list[str],
                 progress: Callable[[int, int], None] | None) -> None:
        self.root = root
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

    # ---- the loop ----
    def run(self) -> RepairResult:
        self._finish_renames()
        rep = check(self.root, backend=self.be, writer_pid=None)
        self._remember(rep)
        self.initially_unclean = any(f.kind == "unclean" for f in rep.findings)
        refused = self._refusal(rep)
        if refused:
            return RepairResult(list(self.seen.values()), rep, [], refused)
        if rep.manifest_problem:
            self._fix_manifest(rep)
        self._learn_manifest()
        os.makedirs(os.path.join(self.root, BLOCKS_DIR), exist_ok=True)
        if any(bf.misnamed is not None for bf in rep.blocks.values()):
            self._fix_names(rep)
            rep = check(self.root, backend=self.be, writer_pid=None)
            self._remember(rep)
        if not rep.directory_ok or rep.lost_writes:
            self._rebuild_directory(rep)
        try:
            self.dir = Directory(os.path.join(self.root, DIRECTORY), read_only=False, sync=True, create=False)
            for _ in range(_MAX_ROUNDS):
                rep = check(self.root, backend=self.be, directory=self.dir, writer_pid=None, progress=self.progress)
                self._remember(rep)
                if not rep.findings or not self._round(rep):
                    break
        finally:
            if self.dir is not None:
                self.dir.close()
                self.dir = None
        final = check(self.root, backend=self.be, writer_pid=None)
        self._remember(final)
        left = {f.ident for f in final.findings}
        out = []
        for ident, f in self.seen.items():
            f.corrected = ident not in left
            if f.corrected:
                f.action = self.done.get(ident[:3]) or (self.block_done.get(f.block, "") if f.block is not None else "") \
                    or _DONE.get(f.kind, "")
            out.append(f)
        return RepairResult(out, final, self.lf.written)

    def _remember(self, rep: Report) -> None:
        for f in rep.findings:
            if f.kind == "unclean" and self.marked_unclean and not self.initially_unclean:
                continue  # our own doing: repair marks the store unclean while it works
            self.seen.setdefault(f.ident, Finding(f.kind, f.block, f.offset, f.detail))

    def _refusal(self, rep: Report) -> str | None:
        if rep.newer_format:
            return ("parts of the store are of a newer format version than this build: repair it with a newer "
                    "blockstore")
        if rep.manifest_newer and (not rep.directory_ok or rep.meta.get("format_version") != FORMAT_VERSION):
            return (f"{MANIFEST} says a newer format version and the directory does not say version "
                    f"{FORMAT_VERSION} to show that this is damage: repair it with a newer blockstore, or fix "
                    "the manifest by hand")
        return None

    def _round(self, rep: Report) -> bool:
        """One phase: the first one with something to do. False when nothing could be done."""
        for phase in (self._phase_files, self._phase_directory, self._phase_counters, self._phase_unreferenced,
                      self._phase_clean):
            if phase(rep):
                return True
        return False

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

    def _learn_manifest(self) -> None:
        with open(os.path.join(self.root, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
        self.store_id = int(m["store_id"])
        bs = m.get("block_size")
        if isinstance(bs, int) and _MIN_BLOCK <= bs <= _MAX_BLOCK:
            self.block_size = bs

    def _counters_from(self, rep: Report) -> None:
        self.next_seq = max(rep.meta.get("next_seq") or 1, rep.max_seq + 1, self.next_seq)
        self.next_block = max(rep.meta.get("next_block") or 1, rep.max_block + 1, self.next_block,
                              max(rep.blocks, default=0) + 1)

    # ---- phase 0: the manifest and the directory ----
    def _fix_manifest(self, rep: Report) -> None:
        p = os.path.join(self.root, MANIFEST)
        old = rep.manifest or {}
        if os.path.lexists(p):
            self.lf.move(p, MANIFEST, rep.manifest_problem or "")
        bs = old.get("block_size")
        m = {
            "magic": "blockstore",
            "format_version": FORMAT_VERSION,
            "store_id": rep.store_id if rep.store_id is not None else secrets.randbits(63),
            "block_size": bs if isinstance(bs, int) and _MIN_BLOCK <= bs <= _MAX_BLOCK else DEFAULT_BLOCK_SIZE,
            "created": old.get("created") if isinstance(old.get("created"), str) else
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_manifest_file(p, m)
        _fsync_dir(self.root)
        self.done[("manifest", None, None)] = f"rewritten (store {m['store_id']}, format version {FORMAT_VERSION})"

    def _fix_names(self, rep: Report) -> None:
        """Rename each misnamed block file to the name its verified header gives. Every file first goes
        to a temporary name, then to its own, so swaps and cycles need no free name; a repair cut short
        finishes the renames when it runs again (_finish_renames)."""
        d = os.path.join(self.root, BLOCKS_DIR)
        moving: list[tuple[int, int, str]] = []  # (block id, id its file's name said, temporary path)
        for bid, bf in sorted(rep.blocks.items()):
            if bf.misnamed is None or bf.path is None:
                continue
            tmp = os.path.join(d, block_file_name(bid) + RENAMING)
            os.rename(bf.path, tmp)
            moving.append((bid, bf.misnamed, tmp))
        _fsync_dir(d)
        for bid, was, tmp in moving:
            self._settle_rename(tmp, bid)
            self.done[("misnamed-block", was, None)] = (f"renamed {block_label(was)}.blk to "
                                                        f"{block_file_name(bid)} (the id in its verified header)")
        _fsync_dir(d)

    def _settle_rename(self, tmp: str, bid: int) -> None:
        final = os.path.join(self.root, BLOCKS_DIR, block_file_name(bid))
        if os.path.lexists(final):  # cannot happen unless something else made that file meanwhile
            self.lf.move(tmp, os.path.basename(tmp), f"its name {block_file_name(bid)} is taken",
                         block=block_label(bid))
        else:
            os.rename(tmp, final)

    def _finish_renames(self) -> None:
        """Renames a repair that was cut short left half done (files under their temporary names)."""
        d = os.path.join(self.root, BLOCKS_DIR)
        if not os.path.isdir(d):
            return
        pending = sorted(n for n in os.listdir(d) if n.endswith(".blk" + RENAMING))
        for name in pending:
            try:
                bid = int(name[:16], 16)
            except ValueError:
                continue
            self._settle_rename(os.path.join(d, name), bid)
        if pending:
            _fsync_dir(d)

    def _rebuild_directory(self, rep: Report) -> None:
        """The directory cannot be read, or lost writes: move it away and rebuild it from the block files."""
        dpath = os.path.join(self.root, DIRECTORY)
        salvaged: dict[bytes, bytes] = {}
        if os.path.lexists(dpath):
            why = ("the directory does not name block files of this store that hold records (it lost writes); "
                   "rebuilt from the blocks" if rep.directory_ok else
                   "the directory could not be read; rebuilt from the blocks")
            moved = self.lf.move(dpath, DIRECTORY, why)
            tmp = os.path.join(self.root, ".fsck-salvage")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                shutil.copytree(moved, tmp)
                salvaged = {k: v for k, v in salvage(tmp) if k[:1] in (TAG_NS, TAG_NS_ID, TAG_BLOCK, TAG_AFFINITY,
                                                                      TAG_META)}
            except OSError:
                salvaged = {}
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        d = Directory(dpath, read_only=False, sync=True, create=True)
        try:
            rb = _Rebuild(self, d, salvaged)
            n = rb.run()
        finally:
            d.close()
        _fsync_dir(self.root)
        self.marked_unclean = True  # the rebuilt directory says clean = 0 until the end
        names = ", ".join(f"{nid}={name} ({how})" for nid, (name, how) in sorted(rb.named.items()))
        self.done[("directory", None, None)] = (f"rebuilt from the blocks: {n} keys, {len(salvaged)} entries "
                                                f"salvaged from the old directory; namespaces {names or 'none'}")

    # ---- phase 1: files ----
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
            self._drop_key(batch, sfx, loc)
        for k, _v in self.dir.scan_prefix(TAG_REVERSE + bid.to_bytes(8, "big")):
            batch.delete(bytes(k))
        batch.delete_block(bid)
        self.dir.write(batch, force_sync=True)
        self.block_done[bid] = f"block entry and {len(named)} directory entries naming it dropped"

    def _named_in(self, rep: Report, bid: int) -> dict[bytes, Location]:
        """Key entries naming block `bid` (through the reverse index, or found without one)."""
        assert self.dir is not None
        out: dict[bytes, Location] = {}
        rev = [(int.from_bytes(k[9:17], "big"), bytes(v))
               for k, v in self.dir.scan_prefix(TAG_REVERSE + bid.to_bytes(8, "big")) if len(k) == 17]
        raws = self.dir.multi_get([location_key(s) for _o, s in rev])
        for (off, sfx), raw in zip(rev, raws):
            loc = None if raw is None else decode_location(bytes(raw))
            if isinstance(loc, Location) and loc.block_id == bid and loc.offset == off:
                out[sfx] = loc
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
            raw = self.be.encode_block_header(h)
            self.be.pwrite(fd, raw + bytes(BLOCK_HEADER_SIZE - len(raw)), 0)
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
                self.lf.save(f"{block_file_name(bf.block_id)}.footer@{data_end}",
                             self.be.pread(fd, size - data_end, data_end), bf.footer_problem or "",
                             block=block_label(bf.block_id))
            self._write_footer(fd, bf.block_id, data_end, recs)
        finally:
            self.be.close(fd)
        self.block_done[bf.block_id] = "footer rewritten (old bytes in lost+found)"

    def _write_footer(self, fd: int, bid: int, data_end: int, recs: list[ScannedRecord]) -> None:
        seqs = [r.info.seq for r in recs]
        self.be.truncate(fd, data_end)
        footer = Footer(bid, data_end, len(recs), min(seqs, default=0), max(seqs, default=0))
        self.be.pwrite(fd, self.be.encode_footer(footer), data_end)
        self.be.sync(fd)

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
                self._drop_key(batch, sfx, loc)
                dropped += 1
        fd = self.be.open(bf.path, False)
        try:
            size = self.be.size(fd)
            if size > cut:
                self.lf.save(f"{block_file_name(bid)}.tail@{cut}", self.be.pread(fd, size - cut, cut),
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
            batch.put_location(csfx, loc)
        for sfx, loc in lost:
            self._drop_key(batch, sfx, loc)
        for k, _v in self.dir.scan_prefix(TAG_REVERSE + bid.to_bytes(8, "big")):
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
        return AppendRecord(loc.kind, int.from_bytes(sfx[:4], "big"), sfx[5:], loc.meta, data, loc.seq,
                            loc.payload_xxh3)

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
                raw = self.be.encode_block_header(BlockHeader(bid, self.store_id, now,
                                                              xxhash.xxh3_64_intdigest(REPAIR_PARTITION)))
                self.be.pwrite(fd, raw + bytes(BLOCK_HEADER_SIZE - len(raw)), 0)
                pls, end = self.be.append(fd, BLOCK_HEADER_SIZE, group, True)
                seqs = [r.seq for r in group]
                self.be.pwrite(fd, self.be.encode_footer(Footer(bid, end, len(group), min(seqs), max(seqs))), end)
                self.be.sync(fd)
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
            new = location_of(r, bid)
            if loc is not None and (loc.block_id, loc.offset) != (bid, off) and \
                    self._reverse_names(loc, sfx):
                batch.delete(reverse_key(loc.block_id, loc.offset))
            batch.put_location(sfx, new)
            return "entry re-derived from its record" if (bid, off) == places[0] and loc is not None \
                else f"entry re-pointed to {block_label(bid)}:{off}"
        self._drop_key(batch, sfx, loc)
        return "entry dropped (no verified record of it)"

    def _reverse_names(self, loc: Location, sfx: bytes) -> bool:
        assert self.dir is not None
        return self.dir.get(reverse_key(loc.block_id, loc.offset)) == sfx

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
                    batch.delete(TAG_NS + name.encode())
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
                batch.delete(TAG_NS_ID + nid.to_bytes(4, "big"))
        for nid in sorted(rep.ns_used | rep.ns_records):
            if nid not in ids:
                name = _unused_name(f"recovered-ns-{nid}", names)
                names[name] = nid
                ids[nid] = name
                batch.put(TAG_NS + name.encode(), nid.to_bytes(4, "little"))
        for nid, name in ids.items():
            if rep.ns_ids.get(nid) != name.encode():
                batch.put(TAG_NS_ID + nid.to_bytes(4, "big"), name.encode())

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
            nid, space, key = int.from_bytes(sfx[:4], "big"), sfx[4], sfx[5:]
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
            if self._reverse_names(old, sfx):
                batch.delete(reverse_key(old.block_id, old.offset))
            batch.put_location(sfx, new)
            d = moved_from.setdefault(old.block_id, [0, 0, 0])
            d[0] += 1
            d[1] += old.record_len
            d[2] += len(sfx) - 5 + old.payload_len
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
        for p in _block_files(self.root):
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


def _old_entry(bid: int, raw: bytes | None) -> BlockEntry | None:
    """A block-table entry salvaged from the old directory, if it decodes."""
    if raw is None:
        return None
    try:
        e = decode_block_entry(bid, raw)
    except BlockstoreError:
        return None
    return e if isinstance(e, BlockEntry) else None


def _block_files(root: str) -> list[str]:
    d = os.path.join(root, BLOCKS_DIR)
    return [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".blk")] if os.path.isdir(d) else []


def _unused_name(base: str, taken: dict[str, int]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}.{n}"
    return name


# ------------------------------------------------------------------------------------------ rebuild


class _Rebuild:
    """A directory from the block files alone: newest record of each key wins (docs/format.md §2.2:
    relocated copies keep their sequence number), a tombstone means absent, and so does a newest
    record whose payload does not verify (an older version must not come back in its place)."""

    def __init__(self, r: _Repairer, d: Directory, salvaged: dict[bytes, bytes]) -> None:
        self.r = r
        self.d = d
        self.salvaged = salvaged
        self.named: dict[int, tuple[str, str]] = {}  # namespace id -> (name, how it was found)

    def run(self) -> int:
        r, be = self.r, self.r.be
        newest: dict[bytes, tuple[int, int, int, ScannedRecord]] = {}  # suffix -> (seq, block, off, record)
        blocks: dict[int, BlockEntry] = {}
        phash: dict[int, tuple[int, set[int], bytes | None]] = {}  # block -> (partition hash, ns ids, chunk prefix)
        max_seq = 0
        old_blocks = {int.from_bytes(k[1:9], "big"): v for k, v in self.salvaged.items()
                      if k[:1] == TAG_BLOCK and len(k) == 9}
        for path in _block_files(r.root):
            name = os.path.basename(path)
            try:
                bid = int(name[:16], 16)
            except ValueError:
                continue
            old = _old_entry(bid, old_blocks.get(bid))
            if old is not None and old.state == BLOCK_RECLAIMING:
                # being deleted on durable proof (its live records were moved, or all died): its records
                # must not count, and the engine's next open finishes the deletion
                blocks[bid] = old
                continue
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
                if header is not None and (header.store_id != r.store_id or header.block_id != bid):
                    continue  # not ours: the next check moves it to lost+found
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
            recs = scan.records if scan else []
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
            blocks[bid] = BlockEntry(
                bid, BLOCK_SEALED if footer is not None else BLOCK_OPEN,
                old.partition if old is not None else RECOVERED_PARTITION,
                written_bytes=sum(x.info.record_len for x in recs), total_records=len(recs),
                tombstones=sum(1 for x in recs if x.info.kind == Kind.TOMBSTONE), data_end=data_end,
                created_ns=header.created_ns if header else now, last_append_ns=now,
                sealed_ns=now if footer is not None else 0)
            prefix = None
            for x in recs:
                max_seq = max(max_seq, x.info.seq)
                sfx = record_suffix(x)
                cur = newest.get(sfx)
                if cur is None or x.info.seq > cur[0] or (x.info.seq == cur[0] and x.payload_ok and
                                                           not cur[3].payload_ok):
                    newest[sfx] = (x.info.seq, bid, x.offset, x)
                if x.info.kind == Kind.CHUNK and prefix is None:
                    prefix = sfx[5:]
            if header is not None:
                phash[bid] = (header.partition_hash, {x.info.ns for x in recs}, prefix)
        batch = DirectoryBatch()
        n = 0
        ns_used: set[int] = set()
        for sfx, (_seq, bid, _off, x) in newest.items():
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
        names = self._names(ns_used, phash)
        for nid, name in names.items():
            batch.put(TAG_NS + name.encode(), nid.to_bytes(4, "little"))
            batch.put(TAG_NS_ID + nid.to_bytes(4, "big"), name.encode())
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
        self.d.write(batch, force_sync=True)
        return n

    def _names(self, used: set[int], phash: dict[int, tuple[int, set[int], bytes | None]]) -> dict[int, str]:
        """A name for every namespace id in use: salvaged, else a candidate whose partition hash some
        block of that namespace alone carries, else recovered-ns-<id>."""
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
                hashes = {xxhash.xxh3_64_intdigest(raw)}
                if prefix is not None:
                    from blockstore.chunks import decode_chunk_key, encode_chunk_key

                    u, s, _c = decode_chunk_key(prefix)
                    hashes.add(xxhash.xxh3_64_intdigest(raw + b"\0u" + encode_chunk_key(u, s, b"")))
                if h in hashes:
                    names[nid] = cand
                    how[nid] = "matched by partition hash"
                    break
        taken = {name: nid for nid, name in names.items()}
        for nid in sorted(used):
            if nid not in names:
                names[nid] = _unused_name(f"recovered-ns-{nid}", taken)
                taken[names[nid]] = nid
                how[nid] = "name lost"
        self.named = {nid: (name, how.get(nid, "")) for nid, name in names.items()}
        return names
