"""What a check reports: the finding kinds (with what --repair does for each), the exit codes, one
finding, what a pass learns about each block, and the report that `repair` acts on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blockstore import logs
from blockstore.directory import BlockEntry, Location
from blockstore.records import BLOCK_HEADER_SIZE, BlockHeader, Footer

_log = logs.get("fsck")
LOGGED_FINDINGS = 100  # a store damaged all over logs this many finding lines, then a count

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
        "block id whose file is there (a duplicate), or the file is a symbolic link to a missing file, a FIFO, a "
        "socket or a device",
        "rewrites the header when the file is this store's block (the old header page goes to lost+found); "
        "a block of another store, or of another id, or a link to nothing, a FIFO, a socket or a device, is moved "
        "to lost+found"),
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
    footer_newer: bool = False  # the last 64 bytes are a footer of a newer format version (not damage)
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
    foreign_directory: bool = False  # the directory names another store (M store_id): nothing in it is ours
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
    bad_counters: list[str] = field(default_factory=list)  # M counters whose value is not a u64 (repair drops them)
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


def log_findings(rep: Report) -> None:
    """A check's result on the `blockstore.fsck` logger (INFO): a summary by kind, then one line per
    finding as `blockstore fsck` prints it (the first LOGGED_FINDINGS)."""
    if not rep.findings:
        _log.info("fsck %s: clean (%d block(s) checked)", rep.path, len(rep.blocks))
        return
    by_kind = rep.summary()["by_kind"]
    _log.info("fsck %s: %d finding(s): %s", rep.path, len(rep.findings),
              ", ".join(f"{kind} {n}" for kind, n in sorted(by_kind.items())))
    for f in rep.findings[:LOGGED_FINDINGS]:
        _log.info("fsck %s: %s", rep.path, f.line())
    if len(rep.findings) > LOGGED_FINDINGS:
        _log.info("fsck %s: ... and %d more finding(s)", rep.path, len(rep.findings) - LOGGED_FINDINGS)
