"""Tolerant readers for fsck and repair: each says what is wrong with a value instead of raising
(directory values, key suffixes; the MANIFEST's is blockstore.manifest.read_manifest), and how findings
name blocks and keys."""

from __future__ import annotations

import os

from blockstore.blocks import BLOCKS_DIR
from blockstore.directory import BLOCK_OPEN, BLOCK_RECLAIMING, BLOCK_SEALED, LOCATION_VERSION, BlockEntry, Location
from blockstore.errors import CorruptionError, NotFound
from blockstore.keys import SPACE_CHUNK, SPACE_KV, TOMBSTONE_META, decode_chunk_key, key_suffix, suffix_ns_id
from blockstore.manifest import MANIFEST
from blockstore.records import MAX_KEY, REC_ALIGNED, Kind, ScannedRecord
from blockstore.store import DIRECTORY


class DirectoryUnreadable(Exception):
    """RocksDB failed while the directory was being read (rocksdict raises plain Exception)."""


def block_label(bid: int) -> str:
    return f"{bid:016x}"


def key_text(suffix: bytes) -> str:
    """A key suffix (ns id + space + user key) for a message: namespace id, space and key."""
    if len(suffix) < 6:
        return f"malformed key {suffix.hex()}"
    nid, space, key = suffix_ns_id(suffix), suffix[4], suffix[5:]
    if space == SPACE_CHUNK:
        try:
            u, s, c = decode_chunk_key(key)
            shown = "/".join(x.decode("utf-8", "backslashreplace") for x in (u, s, c))
            return f"chunk {shown[:80]!r} (ns {nid})"
        except CorruptionError:
            pass
    try:
        text = key.decode("ascii")
        shown = repr(text[:60]) if text.isprintable() else "0x" + key[:40].hex()
    except UnicodeDecodeError:
        shown = "0x" + key[:40].hex()
    return f"key {shown} (ns {nid})"


def record_suffix(r: ScannedRecord) -> bytes:
    """The directory key suffix of a scanned record (a tombstone's meta names its key space)."""
    if r.info.kind == Kind.TOMBSTONE:
        space = SPACE_CHUNK if bytes(r.meta) == TOMBSTONE_META[SPACE_CHUNK] else SPACE_KV
    else:
        space = SPACE_CHUNK if r.info.kind == Kind.CHUNK else SPACE_KV
    return key_suffix(r.info.ns, space, bytes(r.key))


def location_of(r: ScannedRecord, block_id: int) -> Location:
    """The directory location a record's entry should hold."""
    return Location(r.info.kind, r.info.flags, r.info.payload_off, block_id, r.offset, r.info.record_len,
                    r.info.payload_len, r.info.seq, r.info.payload_xxh3, bytes(r.meta))


BLOCK_ENTRY_VERSION = 1  # docs/format.md §5.2


def is_newer_value(raw: bytes, newest: int) -> bool:
    """Whether a directory value is of a newer version than this build writes: not damage (docs/format.md §7),
    so fsck reports it and repair refuses rather than rewrite it."""
    return len(raw) > 0 and raw[0] > newest


def decode_location(raw: bytes) -> Location | str:
    """The location, or why it is not one."""
    if len(raw) < 56:
        return f"location value of {len(raw)} bytes (at least 56 expected)"
    if is_newer_value(raw, LOCATION_VERSION):
        return f"location value version {raw[0]} is newer than this build ({LOCATION_VERSION})"
    if raw[0] not in (1, LOCATION_VERSION):
        return f"location value version {raw[0]} (1 or {LOCATION_VERSION} expected)"
    try:
        loc = Location.decode(raw)
    except CorruptionError as exc:
        return str(exc)
    if loc.kind not in (Kind.KV, Kind.CHUNK):
        return f"location value of record kind {loc.kind}"
    if loc.flags & ~REC_ALIGNED or any(c.flags & ~REC_ALIGNED for c in loc.copies):
        return f"location value with flags {loc.flags:#x}"
    if len({(p.block_id, p.offset) for p in loc.places()}) != len(loc.copies) + 1:
        return "location value names one place twice"
    return loc


def decode_block_entry(bid: int, raw: bytes) -> BlockEntry | str:
    if len(raw) < 88:
        return f"block entry of {len(raw)} bytes (at least 88 expected)"
    if is_newer_value(raw, BLOCK_ENTRY_VERSION):
        return f"block entry version {raw[0]} is newer than this build ({BLOCK_ENTRY_VERSION})"
    if raw[0] != BLOCK_ENTRY_VERSION:
        return f"block entry version {raw[0]} ({BLOCK_ENTRY_VERSION} expected)"
    e = BlockEntry.decode(bid, raw)
    if e.state not in (BLOCK_OPEN, BLOCK_SEALED, BLOCK_RECLAIMING):
        return f"block entry state {e.state}"
    if len(raw) < 88 + int.from_bytes(raw[4:8], "little"):
        return "block entry partition runs past the value"
    return e


def suffix_space_ok(suffix: bytes) -> bool:
    if len(suffix) < 6 or suffix[4] not in (SPACE_KV, SPACE_CHUNK) or len(suffix) - 5 > MAX_KEY:
        return False
    if suffix[4] == SPACE_CHUNK:
        try:
            decode_chunk_key(suffix[5:])
        except CorruptionError:
            return False
    return True


def require_store(path: str | os.PathLike[str]) -> str:
    """`path` as a str if it looks like a store (any of its three parts is there), else NotFound."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise NotFound(f"no store at {root!r} (not a directory)")
    if not any(os.path.exists(os.path.join(root, p)) for p in (MANIFEST, BLOCKS_DIR, DIRECTORY)):
        raise NotFound(f"no store at {root!r} (none of {MANIFEST}, {BLOCKS_DIR}/, {DIRECTORY}/ is there)")
    return root
