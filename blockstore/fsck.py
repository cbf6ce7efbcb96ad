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

`blockstore.repair` uses the facts a pass collects to fix what it found; `blockstore fsck` (cli.py)
prints the findings.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockstore.backend import Backend, get_backend
from blockstore.blocks import BLOCKS_DIR
from blockstore.chunks import decode_chunk_key
from blockstore.directory import (
    BLOCK_OPEN,
    BLOCK_RECLAIMING,
    BLOCK_SEALED,
    SPACE_CHUNK,
    SPACE_KV,
    TAG_BLOCK,
    TAG_KEY,
    TAG_META,
    TAG_NS,
    TAG_NS_ID,
    TAG_REVERSE,
    TAG_SESSION,
    TOMBSTONE_META,
    BlockEntry,
    Directory,
    Location,
    block_key,
    key_suffix,
    reverse_key,
    session_key,
)
from blockstore.errors import (
    BlockstoreError,
    ChecksumMismatch,
    CorruptionError,
    FormatVersionError,
    NotFound,
    TruncatedError,
)
from blockstore.lock import held_by
from blockstore.records import (
    BLOCK_HEADER_SIZE,
    FOOTER_SIZE,
    FORMAT_VERSION,
    MAX_KEY,
    MAX_META,
    REC_ALIGNED,
    RECORD_HEADER_SIZE,
    BlockHeader,
    Footer,
    Kind,
    ScannedRecord,
)
from blockstore.store import DIRECTORY, MANIFEST

LOST_FOUND = "lost+found"
HEAD_MAX = RECORD_HEADER_SIZE + MAX_KEY + MAX_META
_FOOTER_MAGIC = b"BSFOOTER"
_NEWER_RECORD = "a record header of a newer format version"
_RECORD_MAGIC = b"BSR1"
_BATCH = 1024  # directory keys per multi-get
_LIVE_WRITER_PASSES = 5  # passes tried before giving up on a store that keeps changing under the check
_META_NAMES = ("next_seq", "next_block", "next_ns", "bytes_put", "bytes_written", "clean", "format_version")

# exit codes (a bitmask, as e2fsck's)
EXIT_CLEAN = 0
EXIT_CORRECTED = 1
EXIT_UNCORRECTED = 4
EXIT_ERROR = 8
EXIT_USAGE = 16

# kind -> (what it means, what --repair does). docs/fsck.md and `blockstore fsck --help` show these.
KINDS: dict[str, tuple[str, str]] = {
    "manifest": (
        "MANIFEST.json is missing, unreadable, not a blockstore manifest, of an unknown format version, or "
        "names another store id than the block headers",
        "rewrites it (store id from the block headers, format version 1; the old file goes to lost+found); "
        "refuses when the blocks or the directory are of a newer format version too"),
    "directory": (
        "the RocksDB directory is missing, cannot be opened, or fails while being read (block files are then "
        "not judged against it: none is reported as an orphan); or it reads in full but lost writes: block "
        "files of this store that it does not name hold records (a lost or truncated WAL, an old copy)",
        "moves it to lost+found and rebuilds it from the block files: the newest record of each key wins, a "
        "tombstone means absent, a newest record that is damaged means absent; namespace names come from "
        "what RocksDB can salvage of the old directory, else from --namespace names that match the blocks' "
        "partition hashes ('default' is always tried), else recovered-ns-<id>"),
    "directory-version": (
        "the directory's format_version counter is missing or newer than this build",
        "sets it to 1 when nothing else is of a newer version; refuses otherwise"),
    "unclean": (
        "the last writer stopped without closing the store (the next writer runs recovery)",
        "marks the store clean once everything else is repaired and every block file is synced"),
    "counter": (
        "a store counter (next_seq, next_block, next_ns, bytes_put, bytes_written, clean) is missing or not "
        "above what is on disk: new writes would reuse sequence numbers, block ids or namespace ids",
        "raises it above what is on disk (or sets the missing one)"),
    "namespace": (
        "namespace names (N) and ids (I) disagree, a record or key entry uses a namespace id with no name, or "
        "a record carries another namespace than the key entry it is filed under",
        "makes the id index mirror the name index; an id in use with no name gets recovered-ns-<id>; a key "
        "entry naming a record of another namespace is handled as dangling"),
    "block-header": (
        "a block header does not verify (magic, version, checksum), or names another store, or names another "
        "block id whose file is there (a duplicate)",
        "rewrites the header when the file is this store's block (the old header page goes to lost+found); "
        "a block of another store, or of another id, is moved to lost+found"),
    "footer": (
        "a sealed block's footer is missing, torn or does not verify, or disagrees with the block's records",
        "rewrites the footer after the last record (the old bytes go to lost+found)"),
    "record": (
        "a record header does not verify (magic, version, kind, lengths, or the checksum over header, key and "
        "meta) inside a block's data, or a record runs past it",
        "evacuates the block: every record the directory names there that verifies, and every tombstone, is "
        "copied to a new block with its sequence number; a record whose header is damaged is copied too when "
        "the payload at the place its key entry names matches the entry's length and checksum (key, meta and "
        "sequence number from the entry); keys whose payload is damaged are dropped (reads miss); the block "
        "file is moved to lost+found"),
    "payload": (
        "a record's payload does not match its checksum (reads of it raise ChecksumMismatch)",
        "evacuates the block (see record)"),
    "truncated": (
        "a sealed block file ends before its data end (records are cut off)",
        "evacuates the block (see record)"),
    "unsealed": (
        "a block left open by a writer that stopped without closing: its tail may be torn (or its file was "
        "never created, or has no header yet: the writer stopped between naming the block and writing its "
        "header, nothing was committed in it)",
        "truncates it after its last committed record that verifies (the bytes cut go to lost+found), drops "
        "directory entries naming what was cut, writes the footer and marks the block sealed; when a committed "
        "record before the committed end is damaged, the block is evacuated instead (see record), so that the "
        "committed records after it are kept; a block whose file was never created, or has no header, loses its "
        "entry (the file goes to lost+found)"),
    "missing-block": (
        "the block table names a block whose file is missing (its records are lost)",
        "drops the block's entry and every directory entry naming it (reads miss)"),
    "orphan-block": (
        "a block file that no block-table entry names and no directory entry points into (blocks are named "
        "in the directory before their files exist, so this is never a normal state)",
        "a file that holds records of this store that verify means the directory lost writes: the directory "
        "is rebuilt (see directory); any other file (no valid header of this store, or no valid record) is "
        "moved to lost+found"),
    "misnamed-block": (
        "a block file whose verified header names another block of this store than its file name does (files "
        "renamed or swapped): the file is checked as the block its header names",
        "renames it to the name its header gives (a swap or a cycle goes through a temporary name); when that "
        "name is taken by a file that rightly carries it, the file is not renamed and is reported as "
        "block-header instead"),
    "block-entry": (
        "a block-table entry that does not decode, or a block file that directory entries point into but no "
        "block-table entry names",
        "re-derives the entry from the file (the partition, unknown, becomes \\0fsck/recovered)"),
    "block-counts": (
        "block-table counters (written_bytes, total_records, data_end, live_bytes, live_records, "
        "live_logical_bytes, tombstones) disagree with the file and the key entries",
        "re-derives them"),
    "dangling": (
        "a key entry names a missing block, an offset where no record starts, a damaged record, a tombstone, "
        "or a record of another key, namespace, kind or sequence number, or its copy of the record's meta, "
        "lengths or checksum disagrees",
        "re-derives the entry from the record it names when that record is the key's and verifies; else "
        "re-points it to a verified copy of the same record (same sequence number) elsewhere; else drops it"),
    "reverse": (
        "a reverse-index entry (R) without the key entry it claims, or a key entry without its reverse entry",
        "rewrites the reverse index to mirror the key entries"),
    "session-index": (
        "a chunk listing entry (S) without its chunk, or a chunk without its listing entry",
        "rewrites the listing to mirror the chunk entries"),
    "unreferenced": (
        "a valid record newer than what the directory says about its key: a record nothing points at that "
        "is its key's newest, or a tombstone newer than the key's entry (a directory rebuilt from the blocks "
        "would resurrect or change the key)",
        "keeps what reads return: writes a tombstone with a new sequence number (the key stays absent), or "
        "a copy of the record the entry names with a new sequence number (the key keeps its value)"),
}


# ------------------------------------------------------------------------------------------ findings


@dataclass(slots=True)
class Finding:
    kind: str
    block: int | None  # None: the store as a whole
    offset: int | None
    detail: str
    corrected: bool = False
    action: str = ""

    @property
    def where(self) -> str:
        if self.block is None:
            return "-"
        return f"{self.block:016x}" + ("" if self.offset is None else f":{self.offset}")

    @property
    def ident(self) -> tuple[str, int | None, int | None, str]:
        """What identifies a finding across passes: its place (and, for store-wide ones, its words)."""
        return self.kind, self.block, self.offset, self.detail if self.block is None else ""

    def line(self) -> str:
        text = f"{self.kind} {self.where} {self.detail}"
        if self.corrected:
            text += f" [corrected: {self.action}]" if self.action else " [corrected]"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "block": None if self.block is None else f"{self.block:016x}",
                "offset": self.offset, "detail": self.detail, "corrected": self.corrected,
                "action": self.action or None}


@dataclass(slots=True)
class BlockFacts:
    """What one pass learned about one block (small: no record list)."""

    block_id: int
    path: str | None  # None: the file is missing
    size: int = 0
    entry: BlockEntry | None = None
    header: BlockHeader | None = None
    header_problem: str | None = None  # the header does not verify (rewrite it)
    foreign: str | None = None  # a verified header of another store or block id (not ours)
    misnamed: int | None = None  # the file's name says this block id; its verified header says `block_id`
    footer: Footer | None = None  # a valid footer at the end of the file
    footer_problem: str | None = None
    sealed: bool = False  # per the block table (per the footer without a table entry)
    unsealed: bool = False  # open, and no writer is running: a crash left it
    scan_end: int = BLOCK_HEADER_SIZE  # end of the data area checked
    valid_end: int = BLOCK_HEADER_SIZE  # end of the leading run of records that fully verify
    damaged: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, resumed at, why)
    bad_payloads: list[int] = field(default_factory=list)
    truncated: bool = False
    records: int = 0
    tombstones: int = 0
    written: int = 0
    min_seq: int = 0
    max_seq: int = 0
    named: int = 0  # key entries naming the block
    live: tuple[int, int, int] = (0, 0, 0)  # (records, bytes, logical bytes) the key entries name in it
    derived: BlockEntry | None = None  # the table entry as it should be (healthy blocks only)
    orphan_records: int = 0  # an orphan file of this store: records in it that verify (the directory lost them)
    committed: int = BLOCK_HEADER_SIZE  # an unsealed block's committed data end (its block-table entry's)
    stillborn: bool = False  # an open block with nothing committed whose file a crash left without a header

    @property
    def needs_evacuation(self) -> bool:
        if self.path is None or self.foreign or self.stillborn:
            return False
        if self.unsealed:  # damage inside the committed data: sealing would cut the committed records after it
            return self.valid_end < self.committed
        return bool(self.damaged) or bool(self.bad_payloads) or self.truncated


@dataclass(slots=True)
class Unreferenced:
    suffix: bytes
    block_id: int
    offset: int
    seq: int
    kind: int
    entry: Location | None  # the key's entry (older) or None (absent)


@dataclass
class Report:
    """One pass: the findings, and the facts `repair` acts on."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    writer_pid: int | None = None
    passes: int = 1
    manifest: dict[str, Any] | None = None
    manifest_problem: str | None = None
    manifest_newer: bool = False  # the manifest says a format version newer than this build
    store_id: int | None = None  # the manifest's, unless the block headers all say otherwise
    newer_format: bool = False  # a block or the directory is of a newer format version than this build
    directory_ok: bool = False
    lost_writes: bool = False  # the directory reads in full but does not name block files holding our records
    reclaiming: dict[int, BlockEntry] = field(default_factory=dict)  # entries marked for deletion (not judged)
    blocks: dict[int, BlockFacts] = field(default_factory=dict)
    meta: dict[str, int | None] = field(default_factory=dict)
    max_seq: int = 0
    max_block: int = 0
    max_ns: int = 0
    ns_names: dict[str, int] = field(default_factory=dict)  # N
    ns_ids: dict[int, bytes] = field(default_factory=dict)  # I
    ns_used: set[int] = field(default_factory=set)  # namespace ids of key entries
    ns_records: set[int] = field(default_factory=set)  # namespace ids of records
    # directory facts for repair
    dangling: dict[bytes, tuple[Location | None, str]] = field(default_factory=dict)  # suffix -> (entry, why)
    copies: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # suffix -> another place, same seq
    broken_newest: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # undecodable entry -> newest record
    bad_keys: list[bytes] = field(default_factory=list)  # K keys that are not key entries at all
    bad_reverse: list[bytes] = field(default_factory=list)  # R keys to delete
    missing_reverse: list[tuple[bytes, Location]] = field(default_factory=list)
    bad_session: list[bytes] = field(default_factory=list)  # S keys to delete
    missing_session: list[tuple[bytes, bytes]] = field(default_factory=list)  # (S key, chunk suffix)
    bad_block_values: list[int] = field(default_factory=list)  # blocks whose B entry does not decode
    bad_block_keys: list[bytes] = field(default_factory=list)  # B keys that are malformed
    unreferenced: list[Unreferenced] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, block: int | None, offset: int | None, detail: str) -> None:
        self.findings.append(Finding(kind, block, offset, detail))

    def summary(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        for f in self.findings:
            by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
        return {**self.stats, "findings": len(self.findings), "by_kind": by_kind, "writer_pid": self.writer_pid,
                "passes": self.passes, "notes": self.notes}


# ------------------------------------------------------------------------------------------ helpers


class DirectoryUnreadable(Exception):
    """RocksDB failed while the directory was being read (rocksdict raises plain Exception)."""


def block_label(bid: int) -> str:
    return f"{bid:016x}"


def key_text(suffix: bytes) -> str:
    """A key suffix (ns id + space + user key) for a message: namespace id, space and key."""
    if len(suffix) < 6:
        return f"malformed key {suffix.hex()}"
    nid, space, key = int.from_bytes(suffix[:4], "big"), suffix[4], suffix[5:]
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


def decode_location(raw: bytes) -> Location | str:
    """The location, or why it is not one."""
    if len(raw) < 56:
        return f"location value of {len(raw)} bytes (at least 56 expected)"
    if raw[0] != 1:
        return f"location value version {raw[0]} (1 expected)"
    loc = Location.decode(raw)
    if loc.kind not in (Kind.KV, Kind.CHUNK):
        return f"location value of record kind {loc.kind}"
    if loc.flags & ~REC_ALIGNED:
        return f"location value with flags {loc.flags:#x}"
    return loc


def decode_block_entry(bid: int, raw: bytes) -> BlockEntry | str:
    if len(raw) < 88:
        return f"block entry of {len(raw)} bytes (at least 88 expected)"
    if raw[0] != 1:
        return f"block entry version {raw[0]} (1 expected)"
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


def chunk_session_key(suffix: bytes, loc: Location) -> bytes | None:
    """The S key listing this chunk (None: its key or meta cannot say)."""
    try:
        user, session, cid = decode_chunk_key(suffix[5:])
        ts = int(json.loads(loc.meta)["ts_ns"])
    except (CorruptionError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None
    if not 0 <= ts < 1 << 64:
        return None
    return session_key(int.from_bytes(suffix[:4], "big"), user, session, ts, cid)


def parse_session_key(k: bytes) -> tuple[bytes, int] | None:
    """(chunk key suffix, ts_ns) of an S key, or None when it does not parse."""
    try:
        nid = int.from_bytes(k[1:5], "big")
        pos = 5
        ul = int.from_bytes(k[pos : pos + 2], "big")
        user = k[pos + 2 : pos + 2 + ul]
        pos += 2 + ul
        sl = int.from_bytes(k[pos : pos + 2], "big")
        session = k[pos + 2 : pos + 2 + sl]
        pos += 2 + sl
        ts = int.from_bytes(k[pos : pos + 8], "big")
        cid = k[pos + 8 :]
    except IndexError:
        return None
    if len(k) < 5 or len(user) != ul or len(session) != sl or len(k) < pos + 8 or not cid:
        return None
    from blockstore.chunks import encode_chunk_key

    return key_suffix(nid, SPACE_CHUNK, encode_chunk_key(user, session, cid)), ts


def read_manifest(root: str) -> tuple[dict[str, Any] | None, str | None, bool]:
    """(manifest, problem, newer): the manifest as far as it can be trusted, why it cannot be, and
    whether it claims a format version newer than this build."""
    p = os.path.join(root, MANIFEST)
    if not os.path.exists(p):
        return None, f"{MANIFEST} is missing", False
    try:
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as exc:
        return None, f"{MANIFEST} is unreadable ({exc})", False
    if not isinstance(m, dict) or m.get("magic") != "blockstore":
        return None, f"{MANIFEST} is not a blockstore manifest", False
    if not isinstance(m.get("store_id"), int) or isinstance(m.get("store_id"), bool):
        return None, f"{MANIFEST} has no integer store_id", False
    v = m.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        return m, f"{MANIFEST} format_version must be a positive integer, got {v!r}", False
    if v > FORMAT_VERSION:
        return m, f"{MANIFEST} says format version {v}, newer than this build ({FORMAT_VERSION})", True
    return m, None, False


def list_block_files(root: str) -> dict[int, str]:
    d = os.path.join(root, BLOCKS_DIR)
    out: dict[int, str] = {}
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return out
    for name in names:
        if name.endswith(".blk") and len(name) == 20:
            try:
                out[int(name[:16], 16)] = os.path.join(d, name)
            except ValueError:
                continue
    return out


# ------------------------------------------------------------------------------------------ scanning


@dataclass(slots=True)
class Scan:
    records: list[ScannedRecord]
    damaged: list[tuple[int, int, str]]  # (offset of the bad record, where the scan resumed or `end`, why)


def why_invalid(backend: Backend, fd: int, off: int, end: int) -> str:
    """Why the record at `off` does not verify, in words."""
    head = backend.pread(fd, max(0, min(HEAD_MAX, end - off)), off)
    if head[:8] == _FOOTER_MAGIC:
        return "a footer inside the data area"
    if len(head) < RECORD_HEADER_SIZE:
        return f"torn: the data ends {len(head)} bytes into a record header"
    try:
        info = backend.decode_record(head)
    except FormatVersionError:
        return _NEWER_RECORD
    except ChecksumMismatch:
        return "record header checksum mismatch (its header, key or meta changed)"
    except TruncatedError:
        return "torn: the data ends inside the record's key or meta"
    except CorruptionError:
        return "not a record header (magic, version, kind, flags or lengths)"
    if info.record_len > end - off:
        return f"a record of {info.record_len} bytes runs past the end of the data ({end - off} bytes left)"
    return "invalid record"


def resync(backend: Backend, fd: int, pos: int, end: int) -> int | None:
    """The next 8-aligned offset in [pos, end) where a record header verifies (a 64-bit checksum over
    header, key and meta: random bytes do not pass), or None."""
    pos = -(-pos // 8) * 8
    step = 1 << 20  # a multiple of 8: an aligned magic never straddles two reads
    while pos < end:
        buf = backend.pread(fd, min(step, end - pos), pos)
        if not buf:
            return None
        i = buf.find(_RECORD_MAGIC)
        while i != -1:
            p = pos + i
            if p % 8 == 0:
                head = backend.pread(fd, min(HEAD_MAX, end - p), p)
                try:
                    info = backend.decode_record(head)
                except CorruptionError:
                    info = None
                if info is not None and info.record_len <= end - p:
                    return p
            i = buf.find(_RECORD_MAGIC, i + 1)
        pos += len(buf)
    return None


def scan_records(backend: Backend, fd: int, start: int, end: int, *, resynchronize: bool = True) -> Scan:
    """Every record in [start, end) whose header verifies (payloads verified too), resuming after damage."""
    records: list[ScannedRecord] = []
    damaged: list[tuple[int, int, str]] = []
    off = start
    while off < end:
        res = backend.scan(fd, off, end, True)
        records.extend(res.records)
        bad = res.next_offset
        if bad >= end:
            break
        why = why_invalid(backend, fd, bad, end)
        nxt = resync(backend, fd, bad + 8, end) if resynchronize else None
        damaged.append((bad, end if nxt is None else nxt, why))
        if nxt is None:
            break
        off = nxt
    return Scan(records, damaged)


def record_at(backend: Backend, fd: int, off: int, end: int) -> ScannedRecord | None:
    """The record starting at `off` if its header verifies (its payload is verified too), else None."""
    if off % 8 or off < BLOCK_HEADER_SIZE or off >= end:
        return None
    try:
        info = backend.decode_record(backend.pread(fd, min(HEAD_MAX, end - off), off))
    except CorruptionError:
        return None
    if info.record_len > end - off:
        return None
    res = backend.scan(fd, off, off + info.record_len, True)
    return res.records[0] if res.records else None


# ------------------------------------------------------------------------------------------ the check


def require_store(path: str | os.PathLike[str]) -> str:
    """`path` as a str if it looks like a store (any of its three parts is there), else NotFound."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise NotFound(f"no store at {root!r}: not a directory")
    if not any(os.path.exists(os.path.join(root, p)) for p in (MANIFEST, BLOCKS_DIR, DIRECTORY)):
        raise NotFound(f"no store at {root!r}: none of {MANIFEST}, {BLOCKS_DIR}/, {DIRECTORY}/ is there")
    return root


def check(path: str | os.PathLike[str], *, backend: Backend | None = None, directory: Directory | None = None,
          writer_pid: int | None = -1, progress: Callable[[int, int], None] | None = None) -> Report:
    """Check the store at `path` (read-only). `directory`: an open directory to use (repair passes its
    own); else it is opened read-only. `writer_pid`: -1 asks the lock; None asserts that no writer runs
    (repair holds the lock). `progress(done_bytes, total_bytes)` is called as block files are read.

    Raises BlockstoreError when `path` is not a store at all (the caller's operational error)."""
    root = require_store(path)
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
            raws = fresh.multi_get([TAG_KEY + s for s in pending])
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


class _Pass:
    def __init__(self, root: str, backend: Backend, directory: Directory | None, writer_pid: int | None,
                 progress: Callable[[int, int], None] | None) -> None:
        self.root = root
        self.be = backend
        self.own_dir = directory is None
        self.dir = directory
        self.writer = writer_pid
        self.progress = progress
        self.rep = Report(root, writer_pid=writer_pid)
        self.entries: dict[int, BlockEntry] = {}
        self.reclaiming: dict[int, BlockEntry] = {}  # entries marked reclaiming: a normal state, not judged
        self.files: dict[int, str] = {}  # block id -> its file (by the id its verified header gives, see _names)
        self.headers: dict[str, BlockHeader | None] = {}  # file -> its header, where it verifies
        self.misnamed: dict[int, int] = {}  # block id -> the id its file's name says (files to rename)
        # per block: the key entries that name it (from the K stream) whose reverse entry is missing
        self.unindexed: dict[int, list[tuple[bytes, Location]]] = {}
        self.named_sums: dict[int, list[int]] = {}  # block -> [records, bytes, logical bytes] named by K
        self.missing_named: dict[int, int] = {}
        self.nowhere_named: dict[int, int] = {}
        self.tomb_max: dict[bytes, int] = {}
        self.newest_unnamed: dict[bytes, Unreferenced] = {}
        self.unnamed_ns: dict[int, int] = {}
        self.broken: dict[bytes, tuple[int, int, int]] = {}  # suffix of an undecodable entry -> (seq, block, off)
        self.keys = 0

    # ---- directory access that turns RocksDB failures into one exception ----
    def _iter(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        assert self.dir is not None
        it = self.dir.scan_prefix(prefix)
        while True:
            try:
                kv = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise DirectoryUnreadable(str(exc)) from exc
            yield kv

    def _mget(self, keys: Sequence[bytes]) -> list[bytes | None]:
        assert self.dir is not None
        try:
            return self.dir.multi_get(keys)
        except Exception as exc:
            raise DirectoryUnreadable(str(exc)) from exc

    def _locs(self, suffixes: Sequence[bytes]) -> list[Location | str | None]:
        raws = self._mget([TAG_KEY + s for s in suffixes])
        return [None if r is None else decode_location(bytes(r)) for r in raws]

    # ---- the pass ----
    def run(self) -> Report:
        rep = self.rep
        m, problem, newer = read_manifest(self.root)
        rep.manifest, rep.manifest_problem, rep.manifest_newer = m, problem, newer
        if problem:
            rep.add("manifest", None, None, problem)
        self.files = list_block_files(self.root)
        self._store_id(m)
        self._names()
        try:
            self._open_directory()
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

    def _store_id(self, m: dict[str, Any] | None) -> None:
        """This store's id: the manifest's, unless no block header carries it and the headers agree on
        another (then the manifest is what is damaged, not every block)."""
        rep = self.rep
        votes: dict[int, int] = {}
        for path in self.files.values():
            try:
                with open(path, "rb") as f:
                    h = self.be.decode_block_header(f.read(64))
            except (OSError, BlockstoreError):
                self.headers[path] = None
                continue
            self.headers[path] = h
            votes[h.store_id] = votes.get(h.store_id, 0) + 1
        mine = m.get("store_id") if m is not None else None
        if votes and mine not in votes:
            top = max(votes, key=lambda s: votes[s])
            if mine is not None and len(votes) == 1:
                rep.manifest_problem = rep.manifest_problem or f"{MANIFEST} names store {mine}, every block header {top}"
                rep.add("manifest", None, None, rep.manifest_problem)
            rep.store_id = top if mine is None or len(votes) == 1 else mine
        else:
            rep.store_id = mine

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
            self.rep.add("directory", None, None, f"the directory ({DIRECTORY}/) cannot be opened: {exc}")
            return
        self.rep.directory_ok = True

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
                     "bad_session", "missing_session", "bad_block_values", "bad_block_keys", "unreferenced"):
            getattr(rep, name).clear()
        rep.blocks.clear()

    def _load_small(self) -> None:
        rep = self.rep
        for name in _META_NAMES:
            raw = self._mget([TAG_META + name.encode()])[0]
            rep.meta[name] = None if raw is None or len(raw) != 8 else struct.unpack("<Q", raw)[0]
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
            if len(batch) >= _BATCH:
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
                rep.add("dangling", None, None, f"entry of {key_text(suffix)} does not decode: {loc}")
                rep.dangling[suffix] = (None, loc)
                continue
            rep.ns_used.add(int.from_bytes(suffix[:4], "big"))
            good.append((suffix, loc))
        rkeys = self._mget([reverse_key(loc.block_id, loc.offset) for _s, loc in good])
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
        for (suffix, loc), r in zip(good, rkeys):
            bid = loc.block_id
            if bid not in self.entries and bid not in self.files and bid not in self.reclaiming:
                self.nowhere_named[bid] = self.nowhere_named.get(bid, 0) + 1
                rep.dangling[suffix] = (loc, f"names block {block_label(bid)}, which does not exist")
                rep.add("dangling", bid, loc.offset,
                        f"entry of {key_text(suffix)} names block {block_label(bid)}, which does not exist")
                continue
            if bid not in self.files:
                self.missing_named[bid] = self.missing_named.get(bid, 0) + 1
                rep.dangling[suffix] = (loc, f"names block {block_label(bid)}, whose file is missing")
                continue  # one missing-block finding per block says it
            sums = self.named_sums.setdefault(bid, [0, 0, 0])
            sums[0] += 1
            sums[1] += loc.record_len
            sums[2] += len(suffix) - 5 + loc.payload_len
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
            if len(batch) >= _BATCH:
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

    # ---- blocks ----
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
                if facts.entry is not None or bid in self.missing_named:
                    n = self.missing_named.get(bid, 0)
                    rep.add("missing-block", bid, None, f"block file {block_label(bid)}.blk is missing; "
                            f"{n} directory entries name records in it (lost)")
                continue
            try:
                self._block(facts)
            except NotFound:  # deleted since it was listed
                facts.path = None
                if facts.entry is not None:
                    rep.add("missing-block", bid, None, f"block file {block_label(bid)}.blk vanished during the check")
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
            self.rep.newer_format = True
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
            if why == _NEWER_RECORD:
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
            what = "missing" if tail <= 0 else ("torn" if tail < FOOTER_SIZE else "not valid")
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
        for (off, sfx), loc in zip(rev, locs):
            if isinstance(loc, Location) and loc.block_id == bid and loc.offset == off:
                named[off] = (sfx, loc)
                continue
            if isinstance(loc, str):
                continue  # reported with the entry; the reverse entry goes with its repair
            where = "no entry" if loc is None else f"an entry naming {block_label(loc.block_id)}:{loc.offset}"
            rep.add("reverse", bid, off, f"reverse entry names {key_text(sfx)}, which has {where}")
            rep.bad_reverse.append(reverse_key(bid, off))
        for sfx, loc in self.unindexed.get(bid, []):
            named.setdefault(loc.offset, (sfx, loc))
        damaged_at = [(a, b) for a, b, _w in scan.damaged]
        for off, (sfx, loc) in sorted(named.items()):
            bf.named += 1
            r = by_off.get(off)
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
            why = self._disagreement(sfx, loc, r)
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
        for i in range(0, len(unnamed), _BATCH):
            chunk = unnamed[i : i + _BATCH]
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
        prefix = TAG_REVERSE + bid.to_bytes(8, "big")
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
            return f"the record carries namespace {r.info.ns}, not {int.from_bytes(sfx[:4], 'big')}"
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
        for i in range(0, len(entries), _BATCH):
            chunk = entries[i : i + _BATCH]
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
                        f"store counter {name} is missing")
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
