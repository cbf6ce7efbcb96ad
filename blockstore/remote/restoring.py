"""Restore a node whose disk was lost from the bucket (its command: restore.py): every record its uploaded
blocks hold (KV records, tombstones and chunk records, in their namespaces) in a new store, with the node's
store id and block ids.

How: the node's live block objects are downloaded, each verified by the xxh3 its name carries, into the new
store's `blocks/`, and the engine's repair rebuilds the directory from the block files (`repair()`, the path
fsck --repair takes for a lost directory): the newest sequence number of each key wins and a tombstone means
absent, exactly as for the node's own disk. Re-putting the records through the Store API instead would give
them new sequence numbers, lose chunk timestamps' and records' byte identity, and upload every block again;
the block files keep all of it, and the restored blocks are flagged remote under their existing objects.

Which objects: every `blocks/<node>/...` object except those a "superseded" marker (`gc/<node>/...`, remote
GC) names. A superseded object's live records were copied into later blocks whose indexes were published
before the marker, so skipping it loses nothing; keeping it could resurrect what later died: once compaction
has removed the older block locally, a later compaction may drop the key's tombstone (nothing older is left
in the node's block table), and a superseded-but-not-yet-deleted object would then bring the old value back.
What the bucket cannot show: a block compaction emptied just before the node died, whose marker was not yet
published, is restored; its records carry their sequence numbers, so a newer version or tombstone of a key
still wins, but a key whose tombstone a compaction dropped in that same window could come back.

A corrupt object (its bytes do not hash to its name, or its header names another block) is never used: the
restore refuses with every such object named, unless `skip_corrupt`, which restores without them (their
newer versions of keys are then missing, and older ones may show). Nothing is written to the target until
every object is downloaded and verified, so a refusal leaves it empty."""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash

import blockstore
from blockstore.backend import get_backend
from blockstore.blocks import BLOCKS_DIR, block_file_name
from blockstore.errors import BlockstoreError
from blockstore.records import BLOCK_HEADER_SIZE
from blockstore.remote.errors import RemoteError
from blockstore.remote.layout import BLOCKS, GC, INDEX, BlockIndex, Superseded, check_node_id, name_seq
from blockstore.remote.ledger import Ledger
from blockstore.remote.objects import ObjectStore
from blockstore.remote.reclaim import adopt_published
from blockstore.remote.uploader import LEDGER_DIR
from blockstore.store_records import DEFAULT_NAMESPACE
from blockstore.tools.fsck import check
from blockstore.tools.repair import repair

_DOWNLOADING = ".restore-download"  # under the target: verified objects wait here until all are verified


class RestoreError(RemoteError):
    """A restore that cannot go on (a target that is not empty, corrupt objects, objects of two stores);
    nothing was written to the target."""


@dataclass
class RestoreResult:
    target: str
    blocks: list[int] = field(default_factory=list)  # restored block ids
    skipped_superseded: list[str] = field(default_factory=list)  # objects a remote-GC marker names
    superseded_adopted: int = 0  # of those, put on the restored node's reclaim list (deleted after its grace)
    corrupt: dict[str, str] = field(default_factory=dict)  # object -> why it was not used
    bytes_downloaded: int = 0
    flagged: int = 0  # blocks flagged remote (their object and index are in the bucket)
    unindexed: list[int] = field(default_factory=list)  # blocks without an index object: uploaded again later
    namespaces: list[str] = field(default_factory=list)
    unnamed_namespaces: list[str] = field(default_factory=list)  # ids whose name no index object gave
    fsck_findings: list[str] = field(default_factory=list)  # empty: the restored store checks clean
    seconds: float = 0.0


@dataclass(frozen=True)
class _Object:
    key: str
    block_id: int
    file_xxh3: int


def _parse(key: str) -> _Object | None:
    """`blocks/<node>/<block id>-<xxh3>`, else None (not an object this layout writes)."""
    try:
        bid, h = key.rsplit("/", 1)[1].split("-", 1)
        return _Object(key, int(bid, 16), int(h, 16))
    except ValueError:
        return None


def restore_node(objects: ObjectStore, node_id: str, target: str | os.PathLike[str], *, skip_corrupt: bool = False,
                 flag_remote: bool = True, parallel: int = 4,
                 progress: Callable[[str], None] | None = None) -> RestoreResult:
    """Bring back into `target` (absent or an empty folder) every record node `node_id`'s live block
    objects hold; see the module docstring. `parallel`: objects fetched at once (each is held in memory
    whole until written). Raises RestoreError when it cannot: a refusal over the bucket's objects (corrupt,
    two stores, an unreadable marker or index) leaves the target empty."""
    t0 = time.monotonic()
    say = progress or (lambda _msg: None)
    root = os.fspath(target)
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise RestoreError(f"restore target {root!r} must be an empty folder or not exist")
    check_node_id(node_id)
    res = RestoreResult(root)
    live, markers = _live_objects(objects, node_id)
    res.skipped_superseded = sorted(m.data_key for m in markers.values())
    if not live:
        raise RestoreError(f"no live block objects of node {node_id!r} in bucket {objects.settings.bucket!r} "
                           f"({len(res.skipped_superseded)} superseded): check the node id and the bucket")
    indexes, names = _indexes(objects, node_id, live)
    say(f"{len(live)} block object(s) to restore, {len(res.skipped_superseded)} superseded skipped, "
        f"{len(indexes)} index object(s)")
    os.makedirs(root, exist_ok=True)
    scratch = os.path.join(root, _DOWNLOADING)
    try:
        kept = _download(objects, live, scratch, res, say, max(1, parallel))
        if res.corrupt and not skip_corrupt:
            raise RestoreError(f"{len(res.corrupt)} corrupt object(s), not used; nothing restored (rerun with "
                               "skip_corrupt / --skip-corrupt to restore without them): " +
                               "; ".join(f"{k}: {why}" for k, why in sorted(res.corrupt.items())))
        os.rename(scratch, os.path.join(root, BLOCKS_DIR))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)  # copies of bucket objects only: the bucket keeps them
        raise
    res.blocks = sorted(o.block_id for o in kept)
    say(f"rebuilding the directory from {len(kept)} block file(s)")
    rep = repair(root, namespaces=sorted({*names, DEFAULT_NAMESPACE}),
                 namespace_ids={nid: ns for ns, nid in names.items() if nid > 0})
    if rep.refused:
        raise RestoreError(f"the rebuild from the downloaded blocks was refused: {rep.refused}")
    _finish(root, kept, indexes, names, res, flag_remote)
    if flag_remote:  # the restored node's remote GC deletes them after its grace, instead of their leaking
        res.superseded_adopted = adopt_published(root, markers)
    res.fsck_findings = [f"{f.kind}: {f.detail}" for f in check(root, log=False).findings]
    res.seconds = time.monotonic() - t0
    say(f"restored {len(res.blocks)} block(s), {res.bytes_downloaded} bytes, namespaces {res.namespaces}; "
        f"fsck: {'clean' if not res.fsck_findings else res.fsck_findings}")
    return res


def _live_objects(objects: ObjectStore, node_id: str) -> tuple[list[_Object], dict[str, Superseded]]:
    """The node's block objects that no superseded marker names (a marker that cannot be read stops the
    restore: without it, what it supersedes could resurrect older values), and the markers whose objects
    are still in the bucket (gc key -> marker)."""
    superseded: dict[str, tuple[str, Superseded]] = {}  # data key -> (gc key, marker)
    for key in objects.list_after(f"{GC}{node_id}/", None):
        try:
            m = Superseded.decode(objects.get(key))
            # its key list is not needed here (a published marker's pools already applied it): not kept,
            # so memory follows the number of markers, not of the keys they name
            superseded[m.data_key] = (key, Superseded(m.node, m.block_id, m.data_key, m.index_key, m.after_index, []))
        except RemoteError as exc:
            raise RestoreError(f"gc marker {key} cannot be read ({exc}): which object it supersedes is unknown, "
                               "and restoring that object could bring back dead values") from exc
    live: list[_Object] = []
    skipped: dict[str, Superseded] = {}
    for key in objects.list_after(f"{BLOCKS}{node_id}/", None):
        o = _parse(key)
        if o is None:
            raise RestoreError(f"{key} is not a block object name (blocks/<node>/<block id>-<xxh3>)")
        if key in superseded:
            gc_key, marker = superseded[key]
            skipped[gc_key] = marker
        else:
            live.append(o)
    ids = [o.block_id for o in live]
    if len(ids) != len(set(ids)):
        dup = sorted({b for b in ids if ids.count(b) > 1})
        raise RestoreError(f"block id(s) {dup[:8]} have more than one live object: the node id was reused by a "
                           "store that was not restored from this one; restore is refused")
    return sorted(live, key=lambda o: o.block_id), skipped


def _indexes(objects: ObjectStore, node_id: str,
             live: list[_Object]) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
    """Data key -> (index key, object size) for the live objects (the newest publication wins if a block
    was published twice), and namespace name -> id (-1: the name only, from an index without the list).
    One GET per index object of a live block id; the entries themselves are not kept (memory stays
    proportional to the number of blocks, not of records)."""
    live_ids = {o.block_id for o in live}
    live_keys = {o.key for o in live}
    out: dict[str, tuple[str, int]] = {}
    names: dict[str, int] = {}
    for key in objects.list_after(f"{INDEX}{node_id}/", None):
        try:
            if int(key.rsplit("-", 1)[1], 16) not in live_ids:
                continue
        except ValueError as exc:
            raise RestoreError(f"{key} is not an index object name (index/<node>/<number>-<block id>)") from exc
        try:
            ix = BlockIndex.decode(objects.get(key))
        except RemoteError as exc:
            raise RestoreError(f"index object {key} cannot be read: {exc}") from exc
        names.update(ix.namespaces)
        for e in ix.entries:
            names.setdefault(e.ns, -1)
        if ix.data_key in live_keys and (ix.data_key not in out or name_seq(out[ix.data_key][0]) < name_seq(key)):
            out[ix.data_key] = (key, ix.size)
    return out, names


def _download(objects: ObjectStore, live: list[_Object], scratch: str, res: RestoreResult,
              say: Callable[[str], None], parallel: int) -> list[_Object]:
    """GET, verify, write and sync each object under `scratch`, `parallel` at a time (so at most that many
    objects are in memory); results are taken in order, so the progress lines follow the block ids."""
    os.makedirs(scratch)
    be = get_backend()

    def fetch(o: _Object) -> tuple[str | None, int, int]:
        """(why it is corrupt or None, its store id, its size)."""
        data = objects.get(o.key)
        why = _corrupt(be, data, o)
        if why is not None:
            return why, -1, len(data)
        with open(os.path.join(scratch, block_file_name(o.block_id)), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return None, be.decode_block_header(data[:BLOCK_HEADER_SIZE]).store_id, len(data)

    store_ids: dict[int, str] = {}
    kept = []
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="restore") as pool:
        window: deque[tuple[_Object, Future[tuple[str | None, int, int]]]] = deque()
        for n in range(1, len(live) + 1):
            while len(window) < parallel and n - 1 + len(window) < len(live):
                o = live[n - 1 + len(window)]
                window.append((o, pool.submit(fetch, o)))
            o, fut = window.popleft()
            why, store_id, size = fut.result()
            if why is not None:
                res.corrupt[o.key] = why
                say(f"[{n}/{len(live)}] {o.key}: CORRUPT, not used: {why}")
                continue
            store_ids.setdefault(store_id, o.key)
            res.bytes_downloaded += size
            kept.append(o)
            say(f"[{n}/{len(live)}] {o.key}: {size} bytes verified")
    if len(store_ids) > 1:
        raise RestoreError(f"the node's objects belong to {len(store_ids)} different stores (e.g. "
                           f"{sorted(store_ids.values())[:4]}): the node id was reused; restore is refused")
    return kept


def _corrupt(be: object, data: bytes, o: _Object) -> str | None:
    got = xxhash.xxh3_64_intdigest(data)
    if got != o.file_xxh3:
        return f"content xxh3 {got:016x}, its name says {o.file_xxh3:016x}"
    try:
        header = be.decode_block_header(data[:BLOCK_HEADER_SIZE])  # type: ignore[attr-defined]
    except BlockstoreError as exc:
        return f"block header does not decode: {exc}"
    if header.block_id != o.block_id:
        return f"its header says block {header.block_id}, its name block {o.block_id}"
    return None


def _finish(root: str, kept: list[_Object], indexes: dict[str, tuple[str, int]], names: dict[str, int],
            res: RestoreResult, flag_remote: bool) -> None:
    """Flag each restored block whose index is published as remote (and mark it in a fresh uploader
    ledger), so a tier on the restored store does not upload it again; check the namespaces' names."""
    with blockstore.open(root, create=False) as store:
        res.namespaces = store.namespaces()
        res.unnamed_namespaces = [n for n in res.namespaces if n not in names and n != DEFAULT_NAMESPACE]
        wrong = [n for n, nid in names.items() if nid >= 0 and store.namespace_id(n) not in (None, nid)]
        if wrong:
            raise RestoreError(f"namespace(s) {wrong} were named with another id than the node's: the rebuild "
                               "matched the wrong name; check the store before using it")
        ledger = Ledger(os.path.join(root, LEDGER_DIR)) if flag_remote else None
        try:
            for o in kept:
                got = indexes.get(o.key)
                if got is None:
                    res.unindexed.append(o.block_id)
                    continue
                ikey, size = got
                if ledger is not None and store.has_block(o.block_id):
                    store.mark_block_remote(o.block_id, o.key.encode())
                    ledger.mark_uploaded(o.block_id, {
                        "data_key": o.key, "index_key": ikey,
                        "file_xxh3": o.file_xxh3, "size": size})
                    res.flagged += 1
        finally:
            if ledger is not None:
                ledger.close()

