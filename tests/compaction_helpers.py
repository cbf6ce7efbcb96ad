"""Helpers shared by the compaction tests (not a test module: pytest does not collect it).

`scan_blocks` reads every block file of a store the way `blockstore dump --block` does (records live
or dead, tombstones included); `rebuild_violations` checks the invariant that GC's tombstone rules
exist for: a directory rebuilt from the blocks alone (newest sequence number of each key wins, a
tombstone meaning "absent") must agree with the directory the store actually has. A tombstone dropped
while an older record of its key is still on disk would show up here as a resurrected key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from blockstore.directory import Location
from blockstore.keys import SPACE_CHUNK, SPACE_KV, TAG_KEY, TOMBSTONE_META, key_suffix
from blockstore.records import BLOCK_HEADER_SIZE, Kind
from blockstore.store import Store

MIB = 1 << 20

# GC and relocation as eager as the policy allows: every sealed block with 5 % dead bytes is a victim,
# every group requested once is due, a group spilling over even one block more than it needs is
# rewritten, and no write budget stops anything.
AGGRESSIVE: dict[str, Any] = {
    "policy": "full", "gc_invalid_ratio": 0.05, "min_hits": 1, "relocation_slack": 0, "relocation_budget": 1e9,
    "gc_budget": 1e9,
}

_SPACE_OF_TOMBSTONE_META = {v: k for k, v in TOMBSTONE_META.items()}


@dataclass(frozen=True)
class OnDisk:
    """One record found by scanning a block file."""

    block_id: int
    offset: int
    kind: int
    suffix: bytes  # directory key suffix: ns id + space + user key
    seq: int

    @property
    def key(self) -> bytes:
        return self.suffix[5:]


def scan_blocks(s: Store) -> list[OnDisk]:
    """Every record (live or dead) in every block the store's block table names, in block order."""
    out = []
    for e in s.block_table():
        fd = s.backend.open_ro(s.blocks.path(e.block_id))
        try:
            res = s.backend.scan(fd, BLOCK_HEADER_SIZE, e.data_end, False)
        finally:
            s.backend.close(fd)
        for r in res.records:
            if r.info.kind == Kind.TOMBSTONE:
                space = _SPACE_OF_TOMBSTONE_META.get(bytes(r.meta), SPACE_KV)
            else:
                space = SPACE_CHUNK if r.info.kind == Kind.CHUNK else SPACE_KV
            out.append(OnDisk(e.block_id, r.offset, r.info.kind, key_suffix(r.info.ns, space, r.key), r.info.seq))
    return out


def directory_locations(s: Store) -> dict[bytes, Location]:
    return {k[1:]: Location.decode(v) for k, v in s.dir.scan_prefix(TAG_KEY)}


def rebuild_violations(s: Store) -> list[str]:
    """Where a directory rebuilt from the block files would disagree with the real one."""
    newest: dict[bytes, OnDisk] = {}
    for r in scan_blocks(s):
        cur = newest.get(r.suffix)
        if cur is None or r.seq > cur.seq:
            newest[r.suffix] = r
    live = directory_locations(s)
    bad = []
    for sfx, loc in live.items():
        found = newest.get(sfx)
        if found is None:
            bad.append(f"{sfx!r}: live in the directory (seq {loc.seq}) but no record of it on disk")
        elif found.kind == Kind.TOMBSTONE or found.seq != loc.seq:
            bad.append(f"{sfx!r}: directory names seq {loc.seq}; the newest on disk is {Kind(found.kind).name} "
                       f"seq {found.seq} in block {found.block_id:x}")
    for sfx, r in newest.items():
        if sfx not in live and r.kind != Kind.TOMBSTONE:
            bad.append(f"{sfx!r}: absent from the directory but a rebuild would resurrect seq {r.seq} "
                       f"from block {r.block_id:x}")
    return bad


def value(key: bytes, version: int, size: int) -> bytes:
    """A payload that names its key and version, so a reader can tell which write it came from."""
    head = b"%s|v%d|" % (key, version)
    return (head * (size // len(head) + 1))[:size]


def describe_value(v: Any) -> str:
    """A read result as a failure message shows it: absent, a chunk's text, a `value` payload by key and
    version, or bytes no put wrote."""
    if v is None:
        return "absent"
    if isinstance(v, str):
        return f"chunk text {v[:28]!r}"
    try:
        k, ver = parse_value(v)
        return f"{k.decode()} v{ver} ({len(v)} B)"
    except (AssertionError, ValueError):
        return f"{len(v)} bytes that no put wrote"


def parse_value(raw: bytes) -> tuple[bytes, int]:
    """(key, version) a `value` payload was made from; raises if the bytes are not such a payload."""
    key, ver, _rest = bytes(raw[:200]).split(b"|", 2)
    assert ver.startswith(b"v")
    v = int(ver[1:])
    assert bytes(raw) == value(key, v, len(raw)), "payload is not one that was ever written"
    return key, v


def block_file_bytes(path: str) -> int:
    """What a store's block files take on disk, measured with stat (not from the store's or an adapter's
    counters)."""
    folder = os.path.join(path, "blocks")
    return sum(os.stat(os.path.join(folder, n)).st_size for n in os.listdir(folder))


COPIES_PARTITION = b"\0compaction/copies"


def put_shared_with_one_copy(s: Store, value_bytes: bytes = b"S" * 5000) -> tuple[bytes, Any]:
    """Put b"shared" (and b"a") in partition "one", place one copy of b"shared" in the copies partition;
    returns its suffix and its directory value (primary and the one copy)."""
    s.put_many([(b"shared", value_bytes), (b"a", b"A" * 5000)], partition="one")
    sfx = key_suffix(s.namespace_id("default"), SPACE_KV, b"shared")  # type: ignore[arg-type]
    value = s.dir.get_locations([sfx])[0]
    assert value is not None
    payload = s.read_locations([value.primary()])[0]
    assert s.place_copies([(sfx, value, payload)], partition=COPIES_PARTITION) == [True]
    value = s.dir.get_locations([sfx])[0]
    assert value is not None and len(value.copies) == 1
    return sfx, value
