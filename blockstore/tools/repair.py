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

import errno
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from blockstore import logs
from blockstore.backend import Backend, get_backend
from blockstore.blocks import BLOCKS_DIR, block_file_name, block_id_of
from blockstore.directory import Directory, salvage
from blockstore.errors import InvalidArgument, NoSpace, error_for_os
from blockstore.keys import TAG_AFFINITY, TAG_BLOCK, TAG_META, TAG_NS, TAG_NS_ID
from blockstore.lock import WriterLock
from blockstore.manifest import (
    DEFAULT_BLOCK_SIZE,
    MAGIC,
    MANIFEST,
    load_manifest,
    valid_block_size,
    write_manifest_file,
)
from blockstore.records import FORMAT_VERSION
from blockstore.store import DIRECTORY
from blockstore.tools.fsck import check
from blockstore.tools.fsck_decode import block_label, require_store
from blockstore.tools.fsck_report import Finding, Report
from blockstore.tools.lost_found import LostFound, fsync_dir
from blockstore.tools.repair_blocks import BlockRepairs
from blockstore.tools.repair_directory import DirectoryRepairs
from blockstore.tools.repair_rebuild import Rebuild, dropped_blocks

_log = logs.get("repair")
_MAX_ROUNDS = 16
# the remote tier's uploader ledger under a store (blockstore.remote.uploader.LEDGER_DIR; the tools are
# engine-side and do not import the tier)
REMOTE_LEDGER = "remote-ledger"
# names the lost+found folder a rebuild moved the damaged directory to, until the rebuild ends: a rebuild cut short
# (kill -9, a full disk) salvages from there the next time, not from the half-built directory
REBUILDING = ".fsck-rebuilding"
RENAMING = ".fsck-renaming"  # a block file on its way to the name its header gives (blocks/ID.blk.fsck-renaming)

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


def repair(path: str | os.PathLike[str], *, backend: Backend | None = None, namespaces: Sequence[str] = (),
           namespace_ids: Mapping[int, str] | None = None,
           progress: Callable[[int, int], None] | None = None) -> RepairResult:
    """Repair the store at `path` (see the module docstring). `namespaces`: names to try for namespace
    ids whose names are lost with the directory. `namespace_ids`: id -> name known for certain (a restore
    from the bucket's index objects): a rebuild uses them before matching partition hashes, never over
    names salvaged from the directory. Raises StoreLocked if a writer holds the store."""
    known = dict(namespace_ids or {})
    for nid, name in known.items():
        if isinstance(nid, bool) or not isinstance(nid, int) or not 0 < nid < 1 << 32 \
                or not isinstance(name, str) or not name:
            raise InvalidArgument(f"namespace_ids maps ids (1 to 2^32-1) to names, got {nid!r}: {name!r}")
    root = require_store(path)
    LostFound(root).require_usable()
    lock = WriterLock(root)
    lock.acquire(root)
    try:
        return _Repairer(root, backend or get_backend(), list(namespaces), progress, known).run()
    finally:
        lock.release()


class _Repairer(BlockRepairs, DirectoryRepairs):
    """The loop: check, fix the first phase with something to do, check again (phase 0 runs first, once)."""

    # ---- the loop ----
    def run(self) -> RepairResult:
        waiting = self._finish_renames(wait=True)
        rep = check(self.root, backend=self.be, writer_pid=None, log=False)
        self._remember(rep)
        self.initially_unclean = any(f.kind == "unclean" for f in rep.findings)
        refused = self._refusal(rep)
        if refused:
            _log.warning("repair %s refused, nothing changed: %s", self.root, refused)
            return RepairResult(list(self.seen.values()), rep, [], refused)
        if rep.manifest_problem:
            self._fix_manifest(rep)
        self._learn_manifest()
        os.makedirs(os.path.join(self.root, BLOCKS_DIR), exist_ok=True)
        if waiting or any(bf.misnamed is not None for bf in rep.blocks.values()):
            self._fix_names(rep)
            self._finish_renames()
            rep = check(self.root, backend=self.be, writer_pid=None, log=False)
            self._remember(rep)
        if not rep.directory_ok or rep.lost_writes:
            dropped = self._rebuild_directory(rep)
            if dropped:
                _log.warning("repair %s refused a rebuild: %s", self.root, dropped)
                return RepairResult(list(self.seen.values()), rep, [], dropped)
        try:
            self.dir = Directory(os.path.join(self.root, DIRECTORY), read_only=False, sync=True, create=False)
            for _ in range(_MAX_ROUNDS):
                rep = check(self.root, backend=self.be, directory=self.dir, writer_pid=None, progress=self.progress,
                           log=False)
                self._remember(rep)
                if not rep.findings or not self._round(rep):
                    break
        finally:
            if self.dir is not None:
                self.dir.close()
                self.dir = None
        final = check(self.root, backend=self.be, writer_pid=None, log=False)
        self._remember(final)
        left = {f.ident for f in final.findings}
        out = []
        for ident, f in self.seen.items():
            f.corrected = ident not in left
            if f.corrected:
                f.action = self.done.get(ident[:3]) or (self.block_done.get(f.block, "") if f.block is not None else "") \
                    or _DONE.get(f.kind, "")
            out.append(f)
            if f.corrected:
                _log.info("repair %s: %s", self.root, f.line())
            else:
                _log.warning("repair %s: left as it is: %s", self.root, f.line())
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
        missing = [f for f in rep.findings if f.kind == "missing-block"]
        if missing and not os.path.lexists(os.path.join(self.root, BLOCKS_DIR)):
            # the whole folder gone is a volume not mounted or a restore half done, not damage to each block:
            # dropping every entry that names one made the store empty (and the empty blocks/ made for it
            # took the folder moved back in as a subfolder); as the open says, it is to be restored
            return (f"{BLOCKS_DIR}/ is missing, and the directory names {len(missing)} block(s) that held records: "
                    f"restore the folder (repair would drop every key); to drop them, create {BLOCKS_DIR}/ "
                    "empty and run repair again")
        return None

    def _round(self, rep: Report) -> bool:
        """One phase: the first one with something to do. False when nothing could be done."""
        for phase in (self._phase_files, self._phase_directory, self._phase_counters, self._phase_unreferenced,
                      self._phase_clean):
            if phase(rep):
                return True
        return False

    def _learn_manifest(self) -> None:
        m = load_manifest(self.root)  # phase 0 has rewritten one that could not be trusted
        self.store_id = int(m["store_id"])
        bs = m.get("block_size")
        if valid_block_size(bs):
            self.block_size = bs

    # ---- phase 0: the manifest and the directory ----
    def _fix_manifest(self, rep: Report) -> None:
        p = os.path.join(self.root, MANIFEST)
        old = rep.manifest or {}
        if os.path.lexists(p):
            self.lf.move(p, MANIFEST, rep.manifest_problem or "")
        bs = old.get("block_size")
        m = {
            "magic": MAGIC,
            "format_version": FORMAT_VERSION,
            "store_id": rep.store_id if rep.store_id is not None else secrets.randbits(63),
            "block_size": bs if valid_block_size(bs) else DEFAULT_BLOCK_SIZE,
            "created": old.get("created") if isinstance(old.get("created"), str) else
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_manifest_file(p, m)
        fsync_dir(self.root)
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
        fsync_dir(d)
        for bid, was, tmp in moving:
            self._settle_rename(tmp, bid)
            self.done[("misnamed-block", was, None)] = (f"renamed {block_label(was)}.blk to "
                                                        f"{block_file_name(bid)} (the id in its verified header)")
        fsync_dir(d)

    def _settle_rename(self, tmp: str, bid: int) -> None:
        final = os.path.join(self.root, BLOCKS_DIR, block_file_name(bid))
        if os.path.lexists(final):  # cannot happen unless something else made that file meanwhile
            self.lf.move(tmp, os.path.basename(tmp), f"its name {block_file_name(bid)} is taken",
                         block=block_label(bid))
        else:
            os.rename(tmp, final)

    def _finish_renames(self, *, wait: bool = False) -> bool:
        """Renames a repair that was cut short left half done (files under their temporary names). With
        `wait`, a file whose name is still taken stays where it is (True returned): a repair cut short
        in a swap leaves the other file, misnamed, under that name, and _fix_names moves it first."""
        d = os.path.join(self.root, BLOCKS_DIR)
        if not os.path.isdir(d):
            return False
        pending = sorted(n for n in os.listdir(d) if n.endswith(".blk" + RENAMING))
        waiting = False
        for name in pending:
            bid = block_id_of(name[: -len(RENAMING)])
            if bid is None:
                continue
            if wait and os.path.lexists(os.path.join(d, block_file_name(bid))):
                waiting = True
                continue
            self._settle_rename(os.path.join(d, name), bid)
        if pending:
            fsync_dir(d)
        return waiting

    def _rebuild_directory(self, rep: Report) -> str | None:
        """The directory cannot be read, or lost writes: move it away and rebuild it from the block files.
        Refused (why returned, the directory left as it is) when blocks may exist only in an object store."""
        if os.path.isdir(os.path.join(self.root, REMOTE_LEDGER)):
            # a tier uploads this store's blocks and may have dropped local copies: a rebuild from the local
            # files would forget their records (older values coming back) and hand their ids out again,
            # which the tier's ledger still names as uploaded (a new block flagged with an old object)
            return (f"this store's blocks are uploaded to an object store ({REMOTE_LEDGER}/ is here), and a rebuild "
                    "from the local block files cannot see the blocks whose local copies were dropped: restore "
                    "the node from the bucket into a new folder (python -m blockstore.remote.restore), or restore "
                    "the dropped blocks' files from their objects, move remote-ledger/ (and remote-reclaim/) "
                    "aside and repair again (the tier then uploads every block again)")
        dpath, marker = os.path.join(self.root, DIRECTORY), os.path.join(self.root, REBUILDING)
        salvaged: dict[bytes, bytes] = {}
        moved = _read_marker(marker, self.lf.dir)  # the damaged directory, if a rebuild cut short moved it
        if os.path.lexists(dpath) and rep.foreign_directory:  # nothing in another store's directory is ours
            self.lf.move(dpath, DIRECTORY, "another store's directory; rebuilt from the blocks")
        elif os.path.lexists(dpath) or moved:
            # .fsck-salvage is repair's own scratch copy of the damaged directory (RepairDB rewrites what it
            # reads, so it works on a copy); the original stays, then goes to lost+found, so removing the
            # copy, or one an interrupted repair left, deletes nothing that exists only there.
            tmp = os.path.join(self.root, ".fsck-salvage")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                _room_to_salvage(moved or dpath)
                shutil.copytree(moved or dpath, tmp)
                salvaged = {k: v for k, v in salvage(tmp) if k[:1] in (TAG_NS, TAG_NS_ID, TAG_BLOCK, TAG_AFFINITY,
                                                                      TAG_META)}
            except OSError as exc:
                # a full disk is not "nothing to salvage": the rebuild went on without it and every namespace lost
                # its name (recovered-ns-N); stop instead, nothing changed
                if isinstance(exc, NoSpace):
                    raise
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise error_for_os(exc, f"{self.root}: copying the directory to salvage from it") from exc
                salvaged = {}
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            dropped = dropped_blocks(self.root, salvaged)
            if dropped:
                # their records are only in their objects: a rebuild from the local files would forget them,
                # and older values of their keys in local blocks would become current
                return (f"the directory names {len(dropped)} block(s) whose local copy was dropped once its object "
                        f"was confirmed ({', '.join(block_label(b) for b in dropped[:8])}): restore their files "
                        "from their objects (Store.restore_local_copy) before a rebuild from the blocks")
            why = ("the directory does not name block files of this store that hold records (it lost writes); "
                   "rebuilt from the blocks" if rep.directory_ok else
                   "the directory could not be read; rebuilt from the blocks")
            if moved and os.path.lexists(dpath):
                self.lf.move(dpath, DIRECTORY, "half built by a rebuild that was cut short")
            elif not moved:
                name = os.path.basename(self.lf.target(DIRECTORY))
                _write_marker(marker, name, self.root)
                self.lf.move(dpath, name, why)
        d = Directory(dpath, read_only=False, sync=True, create=True)
        try:
            rb = Rebuild(self, d, salvaged)
            n = rb.run()
        finally:
            d.close()
        if os.path.lexists(marker):
            # repair's own note naming the lost+found folder it moved the damaged directory to (_write_marker): it
            # holds no record, the folder it names stays, and the rebuild that needed it has finished
            os.unlink(marker)
        fsync_dir(self.root)
        self.marked_unclean = True  # the rebuilt directory says clean = 0 until the end
        names = ", ".join(f"{nid}={name} ({how})" for nid, (name, how) in sorted(rb.named.items()))
        self.done[("directory", None, None)] = (f"rebuilt from the blocks: {n} keys, {len(salvaged)} entries "
                                                f"salvaged from the old directory; namespaces {names or 'none'}")
        for f in rep.findings:  # a file the directory lost stays in blocks/, named again (unless moved after)
            if f.kind == "orphan-block" and f.block is not None:
                self.block_done[f.block] = "kept: the directory rebuilt from the blocks names it again"
        return None


def _room_to_salvage(source: str) -> None:
    """Raise NoSpace unless the disk has room for a copy of the directory and RocksDB's repair of it, which
    rewrites the tables and logs it reads: a copy cut short by a full disk (shutil.Error, no errno) or a repair
    that could not write were taken for "nothing to salvage", and every namespace of the rebuild lost its name."""
    need = 2 * sum(os.path.getsize(os.path.join(source, n)) for n in os.listdir(source))
    free = shutil.disk_usage(source).free
    if free < need:
        raise NoSpace(errno.ENOSPC, f"{source}: salvaging the directory needs about {need} bytes free, {free} are: "
                      "free some space and run the repair again (nothing was changed)")


def _read_marker(marker: str, lost_found: str) -> str | None:
    """The lost+found folder a rebuild cut short moved the damaged directory to (None: none, or not there)."""
    try:
        with open(marker, encoding="utf-8") as f:
            moved = os.path.join(lost_found, os.path.basename(f.read().strip()))
    except (OSError, ValueError):
        return None
    return moved if os.path.isdir(moved) else None


def _write_marker(marker: str, name: str, root: str) -> None:
    with open(marker, "w", encoding="utf-8") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(root)
