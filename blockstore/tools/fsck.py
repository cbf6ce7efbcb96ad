"""fsck: check a store's files and directory against docs/format.md and against each other.

`check(path)` reads only: it opens the directory read-only and the block files with O_RDONLY, so it is
safe beside a running writer. What it reads (docs/fsck.md has the list of finding kinds):

- MANIFEST.json, the directory's counters and format version, namespace names and ids;
- every block file: header, every record header (with its key and meta) and payload checksum (the C
  core's block scan), the footer of sealed blocks; past a damaged record the scan resynchronizes on
  the next record header that verifies, so one bad record does not hide the rest of its block;
- directory <-> blocks: every key entry (K) names a record of that key, namespace, kind and sequence
  number whose meta and checksum agree; reverse entries (R) and chunk listings (S) mirror the key
  entries; block-table counters agree with the file and the key entries; every valid record that is
  newer than what the directory says about its key is reported (a directory rebuilt from the blocks
  would resurrect it).

A live writer (one holding STORE/LOCK, seen without taking the lock: see `lock.held_by`) is taken
into account: the read-only directory is a snapshot, blocks `open` in it are checked up to their
committed end only (the writer may be appending past it), files created since the snapshot and the
writer's unclean flag are not judged, and a pass that raced with the writer deleting a block (its
compaction, or a block whose records all died) is run again on a fresh snapshot.

The pass is a `_Pass` here (the manifest, which file is which block) made of two check groups on one
shared state (fsck_pass.py): fsck_directory.py (the directory side) and fsck_blocks.py (the block files);
fsck_scan.py scans block data, fsck_decode.py reads values tolerantly, fsck_report.py holds the finding
kinds and the facts. `blockstore.tools.repair` uses the facts a pass collects to fix what it found;
`blockstore fsck` (tools/cli.py) prints the findings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from blockstore.backend import Backend, get_backend, refuse_special_file
from blockstore.blocks import BLOCKS_DIR, list_block_files
from blockstore.directory import BLOCK_RECLAIMING, BlockEntry, Directory, Location
from blockstore.errors import BlockstoreError, NotFound
from blockstore.keys import TAG_BLOCK, block_key, location_key
from blockstore.lock import held_by
from blockstore.manifest import MANIFEST, field_problem, read_manifest
from blockstore.records import BLOCK_HEADER_SIZE, Kind
from blockstore.store import DIRECTORY
from blockstore.tools.fsck_blocks import BlockChecks
from blockstore.tools.fsck_decode import (
    DirectoryUnreadable,
    decode_block_entry,
    decode_location,
    record_suffix,
    require_store,
)
from blockstore.tools.fsck_directory import DirectoryChecks
from blockstore.tools.fsck_report import Report, log_findings

_LIVE_WRITER_PASSES = 5  # passes tried before giving up on a store that keeps changing under the check


def check(path: str | os.PathLike[str], *, backend: Backend | None = None, directory: Directory | None = None,
          writer_pid: int | None = -1, progress: Callable[[int, int], None] | None = None,
          log: bool = True) -> Report:
    """Check the store at `path` (read-only). `directory`: an open directory to use (repair passes its
    own); else it is opened read-only. `writer_pid`: -1 asks the lock; None asserts that no writer runs
    (repair holds the lock). `progress(done_bytes, total_bytes)` is called as block files are read.
    `log`: the findings go to the `blockstore.fsck` logger (INFO); repair's own checks do not log them.

    Raises BlockstoreError when `path` is not a store at all (the caller's operational error)."""
    rep = _check(require_store(path), backend, directory, writer_pid, progress)
    if log:
        log_findings(rep)
    return rep


def _check(root: str, backend: Backend | None, directory: Directory | None, writer_pid: int | None,
           progress: Callable[[int, int], None] | None) -> Report:
    be = backend or get_backend()
    pid = held_by(root) if writer_pid == -1 else writer_pid
    if pid is None or directory is not None:
        return _Pass(root, be, directory, pid, progress).run()
    # a live writer: a directory read that failed under it is retried on a fresh snapshot; blocks it
    # deleted during the pass are told apart from missing ones (_settle)
    rep = _Pass(root, be, None, pid, progress).run()
    for attempt in range(2, _LIVE_WRITER_PASSES + 1):
        if not any(f.kind == "directory" for f in rep.findings):
            break
        time.sleep(0.05 * attempt)
        rep = _Pass(root, be, None, pid, progress).run()
        rep.passes = attempt
    if not any(f.kind == "directory" for f in rep.findings):
        _settle(root, be, rep)
    return rep


def _fresh_snapshot(root: str) -> Directory | None:
    try:
        return Directory(os.path.join(root, DIRECTORY), read_only=True, sync=False, create=False)
    except BlockstoreError:
        return None


def _reclaiming(bid: int, raw: bytes) -> bool:
    """Whether a block-table value says the block is being deleted (the writer's deletion in progress)."""
    try:
        e = decode_block_entry(bid, bytes(raw))
    except BlockstoreError:
        return False
    return isinstance(e, BlockEntry) and e.state == BLOCK_RECLAIMING


def _settle(root: str, be: Backend, rep: Report) -> None:
    """After a pass beside a live writer: a block whose file is missing is a finding only if a fresh
    snapshot still names it (else the writer deleted it: compaction, or all its records died). Such a
    deletion may have taken tombstones with it (GC carries them to a block newer than the pass's
    snapshot), so each `unreferenced` finding is confirmed against a fresh snapshot and the blocks
    created since: it stands only if its key still has no newer entry and no newer tombstone."""
    missing = {f.block for f in rep.findings if f.kind == "missing-block" and f.block is not None}
    if not missing:
        return
    gone: set[int] = set()
    # a read-only open of a live RocksDB can lag the writer a little (around a memtable flush): a block
    # is missing only if snapshots taken over a while all still name it
    for attempt in range(4):
        if attempt:
            time.sleep(0.1 * attempt)
        fresh = _fresh_snapshot(root)
        if fresh is None:
            continue
        ids = sorted(missing - gone)
        try:
            still = fresh.multi_get([block_key(b) for b in ids])
        except Exception:
            still = [b"?"] * len(ids)
        finally:
            fresh.close()
        files = list_block_files(root)
        gone |= {b for b, v in zip(ids, still) if v is None or b in files or _reclaiming(b, v)}
        if gone == missing:
            break
    if not gone:
        return
    rep.findings = [f for f in rep.findings if not (f.kind == "missing-block" and f.block in gone)]
    for bid in sorted(b for b in gone if b is not None):
        rep.blocks.pop(bid, None)
    rep.notes.append(f"{len(gone)} blocks were deleted by the writer during the check (compaction): not judged")
    if rep.unreferenced:
        _confirm_unreferenced(root, be, rep)


def _confirm_unreferenced(root: str, be: Backend, rep: Report) -> None:
    pending = {u.suffix: u for u in rep.unreferenced}
    scanned = set(rep.blocks)
    for _attempt in range(3):
        fresh = _fresh_snapshot(root)
        if fresh is None:
            return
        vanished = False
        try:
            raws = fresh.multi_get([location_key(s) for s in pending])
            for (sfx, u), raw in zip(list(pending.items()), raws):
                loc = None if raw is None else decode_location(bytes(raw))
                if isinstance(loc, Location) and loc.seq >= u.seq:
                    del pending[sfx]  # the writer has written the key since
            new = {}
            for k, v in fresh.scan_prefix(TAG_BLOCK):
                bid = int.from_bytes(k[1:9], "big")
                e = decode_block_entry(bid, bytes(v))
                if bid not in scanned and isinstance(e, BlockEntry):
                    new[bid] = e
        except Exception:
            return
        finally:
            fresh.close()
        for bid, e in sorted(new.items()):
            try:
                fd = be.open_ro(os.path.join(root, BLOCKS_DIR, f"{bid:016x}.blk"))
            except NotFound:
                vanished = True
                continue
            try:
                end = min(e.data_end, be.size(fd))
                recs = be.scan(fd, BLOCK_HEADER_SIZE, end, False).records if end > BLOCK_HEADER_SIZE else []
            finally:
                be.close(fd)
            scanned.add(bid)
            for r in recs:
                if r.info.kind == Kind.TOMBSTONE:
                    sfx = record_suffix(r)
                    cand = pending.get(sfx)
                    if cand is not None and r.info.seq > cand.seq:
                        del pending[sfx]  # carried by GC out of a block deleted during the pass
        if not vanished or not pending:
            break
    dropped = {s for s in (u.suffix for u in rep.unreferenced) if s not in pending}
    if dropped:
        keep = {(u.block_id, u.offset) for u in rep.unreferenced if u.suffix in pending}
        rep.findings = [f for f in rep.findings if f.kind != "unreferenced" or (f.block, f.offset) in keep]
        rep.unreferenced = [u for u in rep.unreferenced if u.suffix in pending]


class _Pass(DirectoryChecks, BlockChecks):
    """One pass over the store: the manifest, which file is which block, then the directory and block checks."""

    # ---- the pass ----
    def run(self) -> Report:
        rep = self.rep
        got = read_manifest(self.root)
        m, problem, newer = got.manifest, got.problem, got.newer
        rep.manifest, rep.manifest_problem, rep.manifest_newer = m, problem, newer
        if problem is None and m is not None:
            problem = rep.manifest_problem = field_problem(m)
        if problem:
            rep.add("manifest", None, None, problem)
        self.files = list_block_files(self.root)
        try:
            self._open_directory()
            owner = self._directory_owner()
            self._store_id(m, owner)
            self._names()
            self._foreign_directory(owner)
            if self.dir is not None:
                self._load_small()
                self._key_stream()
                self._session_stream()
                self._reverse_stream()
            self._blocks()
            if self.dir is not None and rep.directory_ok:
                self._lost_writes()
                self._resolve_unreferenced()
                self._namespaces()
                self._counters()
        except DirectoryUnreadable as exc:
            self._directory_failed(f"the directory ({DIRECTORY}/) failed while being read: {exc}")
            self._blocks()
        finally:
            if self.own_dir and self.dir is not None:
                self.dir.close()
        rep.stats.update(blocks=len(rep.blocks), block_files=len(self.files), keys=self.keys,
                         records=sum(b.records for b in rep.blocks.values()),
                         bytes=sum(b.size for b in rep.blocks.values()))
        return rep

    def _store_id(self, m: dict[str, Any] | None, owner: int | None) -> None:
        """This store's id: the manifest's, unless no block header carries it and the headers agree on
        another (then the manifest is what is damaged, not every block), and the directory (`owner`, its
        `M store_id`) does not side with the manifest (then a block naming another store is that store's:
        one such file in place of a one-block store's only block made repair adopt it, values and all)."""
        rep = self.rep
        votes: dict[int, int] = {}
        for path in self.files.values():
            try:
                refuse_special_file(path)  # a FIFO: open() waits for a writer forever
                with open(path, "rb") as f:
                    h = self.be.decode_block_header(f.read(64))
            except (OSError, BlockstoreError):
                self.headers[path] = None
                continue
            self.headers[path] = h
            votes[h.store_id] = votes.get(h.store_id, 0) + 1
        mine = m.get("store_id") if m is not None else None
        if mine is None and owner in votes:  # no MANIFEST: the directory's word, where a block header agrees (two
            mine = owner  # stray files of another store outvoted the only block, and repair adopted their values)
        if votes and mine not in votes and (owner is None or owner != mine):
            top = max(votes, key=lambda s: votes[s])
            if mine is not None and len(votes) == 1:
                rep.manifest_problem = rep.manifest_problem or f"{MANIFEST} names store {mine}, every block header {top}"
                rep.add("manifest", None, None, rep.manifest_problem)
            rep.store_id = top if mine is None or len(votes) == 1 else mine
        else:
            rep.store_id = mine if mine is not None else owner  # no MANIFEST and no block: the directory's word

    def _names(self) -> None:
        """Files are the blocks their verified headers name, not what their names say: a file whose header
        names another block of this store is checked as that block (and renamed by repair) when that
        block has no rightful file of its own; two files swapped are each the other's."""
        sid = self.rep.store_id
        by_name = dict(self.files)
        claims: dict[int, list[int]] = {}  # header id -> names of the files whose header claims it
        for name_id, path in by_name.items():
            h = self.headers.get(path)
            if h is not None and sid is not None and h.store_id == sid and h.block_id != name_id:
                claims.setdefault(h.block_id, []).append(name_id)
        for hid, names in sorted(claims.items()):
            if len(names) != 1:
                continue  # two files claim the block: neither is renamed (both reported as block-header)
            holder = by_name.get(hid)
            if holder is not None:
                h = self.headers.get(holder)
                if h is None or h.store_id != sid or h.block_id == hid:
                    continue  # its name is taken by its own file (or one that cannot say): a duplicate
            self.misnamed[hid] = names[0]
        if not self.misnamed:
            return
        files = {b: p for b, p in by_name.items() if b not in self.misnamed.values()}
        for hid, name_id in self.misnamed.items():
            files[hid] = by_name[name_id]
        self.files = files
