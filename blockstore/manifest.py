"""STORE/MANIFEST.json (docs/format.md §1): what it must hold, how it is read and written, and the block
sizes a store may use.

One owner for these facts: the store loads the MANIFEST with `load_manifest` (strict: it raises), fsck
and repair read it with `read_manifest` (tolerant: it says what is wrong and keeps what it can), and the
same rules decide both. Every MANIFEST is written by `write_manifest_file` (a synced temp file renamed
over the old one).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from typing import Any, TypeGuard

from blockstore.errors import CorruptionError, FormatVersionError, IOErrorBS
from blockstore.records import FORMAT_VERSION

MANIFEST = "MANIFEST.json"
MAGIC = "blockstore"

DEFAULT_BLOCK_SIZE = 64 << 20
# small blocks suit chunk-record stores; KV wants large ones
MIN_BLOCK, MAX_BLOCK = 64 << 10, 1 << 40


def valid_block_size(size: object) -> TypeGuard[int]:
    """Whether `size` is a block size a store may use (an int, not a bool, in MIN_BLOCK..MAX_BLOCK)."""
    return isinstance(size, int) and not isinstance(size, bool) and MIN_BLOCK <= size <= MAX_BLOCK


@dataclass(frozen=True, slots=True)
class ManifestRead:
    """What `read_manifest` found. `manifest`: the MANIFEST as far as it can be trusted (None when it is
    missing, unreadable, or names no usable store_id); `problem`: why it cannot be trusted (None: it
    can); `newer`: it claims a format version newer than this build."""

    manifest: dict[str, Any] | None
    problem: str | None
    newer: bool = False


def read_manifest(root: str) -> ManifestRead:
    """The tolerant reader: never raises for what the file holds (fsck, repair)."""
    p = os.path.join(root, MANIFEST)
    if not os.path.exists(p):
        return ManifestRead(None, f"{MANIFEST} is missing")
    mode = os.stat(p).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO: open() waits forever; /dev/zero: read() never ends
        return ManifestRead(None, f"{MANIFEST} is not a regular file ({stat.filemode(mode)})")
    try:
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except PermissionError as exc:  # not damage: repair replaced a good MANIFEST (its block size lost) for it
        raise IOErrorBS(exc.errno or errno.EACCES, f"{MANIFEST} cannot be read: {exc.strerror}; nothing is "
                        f"damaged: give this user access to {p!r}") from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        return ManifestRead(None, f"{MANIFEST} is unreadable ({exc})")
    if not isinstance(m, dict) or m.get("magic") != MAGIC:
        return ManifestRead(None, f"{MANIFEST} is not a blockstore manifest")
    sid = m.get("store_id")
    if not isinstance(sid, int) or isinstance(sid, bool):
        return ManifestRead(None, f"{MANIFEST} has no integer store_id")
    if not 0 <= sid < 1 << 64:  # block headers hold it as a u64
        return ManifestRead(None, f"{MANIFEST} store_id {sid} is not a u64")
    v = m.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        return ManifestRead(m, f"{MANIFEST} format_version must be a positive integer, got {v!r}")
    if v > FORMAT_VERSION:
        return ManifestRead(m, f"{MANIFEST} says format version {v}, newer than this build ({FORMAT_VERSION})",
                            newer=True)
    return ManifestRead(m, None)


RECORDED_DURABILITIES = ("sync", "cache")  # what a writer records (remote mode records "sync", its local part)


def field_problem(m: dict[str, Any]) -> str | None:
    """A field an open can do without but fsck must report: a `block_size` or `durability` that is present but
    not one a writer records (a damaged file that is still valid JSON). The open then uses its own block size
    and judges a crashed session as synced (the strict reading: refuse rather than drop); None when both are
    absent (older stores) or valid."""
    bs = m.get("block_size", MIN_BLOCK)
    if not valid_block_size(bs):
        return f"{MANIFEST} block_size {bs!r} is not a block size ({MIN_BLOCK}..{MAX_BLOCK} bytes)"
    d = m.get("durability", "sync")
    if d not in RECORDED_DURABILITIES:
        return f"{MANIFEST} durability {d!r} is not one of {list(RECORDED_DURABILITIES)}"
    return None


def recorded_durability(m: dict[str, Any], default: str) -> str:
    """The durability the last writer ran under: `default` when the MANIFEST does not say (older stores),
    "sync" when it says something no writer records (damage: the strict reading keeps a crashed sync
    session's acknowledged records from being judged as unsynced pages and dropped)."""
    if "durability" not in m:
        return default
    d = m["durability"]
    return d if d in RECORDED_DURABILITIES else "sync"


def load_manifest(root: str) -> dict[str, Any]:
    """The strict loader (the store's open): the MANIFEST, or CorruptionError (FormatVersionError for a
    newer format version) naming the file and what is wrong."""
    got = read_manifest(root)
    if got.problem is None and got.manifest is not None:
        return got.manifest
    where = os.path.join(root, MANIFEST)
    if got.newer:
        raise FormatVersionError(f"{where}: {got.problem}")
    raise CorruptionError(f"{where}: {got.problem}; run `blockstore fsck --repair {root}` (it rewrites the MANIFEST "
                          "from the block headers and the directory; the old one goes to lost+found)")


def new_manifest(*, block_size: int, durability: str) -> dict[str, Any]:
    """The MANIFEST of a store being created (a fresh random store_id)."""
    return {
        "magic": MAGIC,
        "format_version": FORMAT_VERSION,
        "store_id": secrets.randbits(63),
        "block_size": block_size,
        "durability": durability,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_manifest_file(p: str, m: dict[str, Any]) -> None:
    """Write a MANIFEST atomically: a synced temp file renamed over `p`. The caller syncs the directory
    (the rename is durable only then)."""
    tmp = p + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(m, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def fsync_dir(*paths: str) -> None:
    """Sync folders: a rename or a new file in one is durable only then."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def last_writer_synced(store_root: str, *, default: bool) -> bool:
    """Whether the store's last writer ran in sync mode (MANIFEST.json "durability", docs/format.md §1):
    its WAL must then read to its end. `default` when the MANIFEST does not say (older stores, or a
    MANIFEST that is missing or unreadable: fsck reports that on its own)."""
    p = os.path.join(store_root, MANIFEST)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):  # a FIFO: open() waits forever
            return default
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError, RecursionError):
        return default
    if not isinstance(m, dict):
        return default
    return recorded_durability(m, "sync" if default else "cache") == "sync"
