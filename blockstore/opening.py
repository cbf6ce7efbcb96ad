"""Opening a store: the checks made before anything is touched, and a new store's folders.

    STORE/MANIFEST.json   (manifest.py)
    STORE/directory/      the RocksDB directory (directory.py)
    STORE/blocks/         the block files (blocks.py)
    STORE/LOCK            the writer's lock (lock.py)
"""

from __future__ import annotations

import os
from typing import Any

from blockstore import logs, metrics
from blockstore.backend import Backend
from blockstore.blocks import BLOCKS_DIR, block_id_of
from blockstore.errors import BlockstoreError, CorruptionError, InvalidArgument, error_for_os
from blockstore.lock import LOCK_FILE
from blockstore.manifest import MANIFEST, valid_block_size
from blockstore.metrics import MeasuredStore
from blockstore.records import BLOCK_HEADER_SIZE
from blockstore.reserve import RESERVE

DIRECTORY = "directory"

_log = logs.get("open")

# What a creation of ours cut short leaves before the MANIFEST is written (make_store_dirs, Store._open_files), and
# lost+found (fsck --repair's, or a file system's root when a store is made at a mount point): a
# directory holding nothing else may be created into.
_CREATION_LEFTOVERS = frozenset({BLOCKS_DIR, DIRECTORY, LOCK_FILE, MANIFEST + ".tmp", "lost+found", RESERVE})


def check_store_path(path: str, create: bool, read_only: bool, allow_non_empty: bool) -> None:
    """Refuse, before anything is written, a path that cannot be a store: a file (or a path through
    one), or, where a store would be created, a non-empty directory that is not a store (unless
    `allow_non_empty`): creating into someone's data directory must never happen by mistake."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return  # created (with its parents) by make_store_dirs
    except NotADirectoryError:
        raise InvalidArgument(f"path {path!r} is not a directory: a component of it is a file") from None
    except OSError as exc:
        raise error_for_os(exc, f"open store {path!r}") from exc
    if not os.path.isdir(path):
        raise InvalidArgument(f"path {path!r} is not a directory (a store is a directory)")
    if not create or read_only or allow_non_empty or os.path.lexists(os.path.join(path, MANIFEST)):
        return
    try:
        foreign = sorted(set(os.listdir(path)) - _CREATION_LEFTOVERS)
        blocks_dir = os.path.join(path, BLOCKS_DIR)
        lost_manifest = os.path.isdir(blocks_dir) and any(n.endswith(".blk") for n in os.listdir(blocks_dir))
    except OSError as exc:
        raise error_for_os(exc, f"list {path!r}") from exc
    if foreign and not lost_manifest:  # a lost MANIFEST: _open_files says so (CorruptionError)
        shown = ", ".join(repr(n) for n in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise InvalidArgument(
            f"path {path!r} is a non-empty directory that is not a store (no {MANIFEST}; it holds {shown}): "
            "pass allow_non_empty=True to create a store in it anyway"
        )


def check_store_layout(path: str) -> None:
    """An existing store (it has a MANIFEST) whose blocks/ folder is missing or is not a folder: refused
    before the directory is opened, naming the folder. A store's blocks/ is made before its MANIFEST, so
    only damage (a deleted or replaced folder, a half-restored copy) gets here; opening anyway would have
    raised a bare OSError or, worse, let the directory name records in files that are not there."""
    blocks_dir = os.path.join(path, BLOCKS_DIR)
    if os.path.isdir(blocks_dir):
        return
    what = "is not a folder" if os.path.lexists(blocks_dir) else "is missing"
    raise CorruptionError(f"{blocks_dir!r} {what}: the store's block files are not there (restore the folder; "
                          f"`blockstore fsck {path}` lists the records the directory names in it)")


def check_manifest_names_the_blocks(path: str, store_id: int, backend: Backend) -> None:
    """Before a writable open: the MANIFEST's store_id against the headers of up to three block files (the
    first, the middle and the last). MANIFEST.json has no checksum, so one flipped digit of store_id is still a
    valid MANIFEST; a writer took it, wrote blocks under the wrong id, and `fsck --repair` then moved every earlier
    block to lost+found as another store's (tests/test_review_session26.py). Refused only when every header read
    names another store, so one block copied in from elsewhere does not stop an open (fsck reports it)."""
    folder = os.path.join(path, BLOCKS_DIR)
    names = sorted(n for n in os.listdir(folder) if block_id_of(n) is not None)
    if not names:
        return
    others = set()
    for name in {names[0], names[len(names) // 2], names[-1]}:
        try:
            # O_NONBLOCK: a FIFO in a block file's place (damage) must not hang the open waiting for a writer
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                header = backend.decode_block_header(os.pread(fd, BLOCK_HEADER_SIZE, 0))
            finally:
                os.close(fd)
        except (OSError, BlockstoreError):
            continue  # no header to judge by (a block a crash left without one): fsck's matter
        if header.store_id == store_id:
            return
        others.add(header.store_id)
    if others:
        raise CorruptionError(
            f"{os.path.join(path, MANIFEST)} names store {store_id}, but the block files read name store "
            f"{', '.join(map(str, sorted(others)))}: the MANIFEST is damaged (or another store's); nothing was "
            f"changed; run `blockstore fsck --repair {path}` (it rewrites the MANIFEST when every block agrees)")


def check_options(path: Any, *, durability: Any, block_size: Any, max_open_blocks: Any, idle_seal_seconds: Any,
                   read_gap: Any, on_corrupt: Any, remote_seal_seconds: Any = 0.2, remote_timeout: Any = 30.0) -> str:
    """Store()'s arguments checked before anything is touched; the path as a str."""
    try:
        fs_path = os.fspath(path)
    except TypeError:
        raise InvalidArgument(f"path must be a str or os.PathLike, not {type(path).__name__}") from None
    if not isinstance(fs_path, str) or not fs_path or "\0" in fs_path:
        raise InvalidArgument(f"path must be a non-empty str without NUL characters, got {fs_path!r}")
    try:  # RocksDB (rocksdict) takes UTF-8 paths only: a store made at another path failed half-created
        fs_path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"path {fs_path!r} is not valid UTF-8 (its bytes: {os.fsencode(fs_path)!r}); the "
                              "store's RocksDB directory needs a UTF-8 path") from None
    if durability not in ("cache", "sync", "remote"):
        raise InvalidArgument(f"durability must be 'cache', 'sync' or 'remote', got {durability!r}")
    if block_size is not None and not valid_block_size(block_size):
        raise InvalidArgument(f"block_size must be an int between 64 KiB and 1 TiB, got {block_size!r}")
    # each open block holds a descriptor: 10**9 was accepted, then writes failed with EMFILE far from the setting
    if isinstance(max_open_blocks, bool) or not isinstance(max_open_blocks, int) or not 1 <= max_open_blocks <= 65536:
        raise InvalidArgument(f"max_open_blocks must be an int in [1, 65536], got {max_open_blocks!r}")
    if on_corrupt not in ("raise", "miss"):
        raise InvalidArgument(f"on_corrupt must be 'raise' or 'miss', got {on_corrupt!r}")
    # bounded: inf (or an int too large for a float) passed here and then made every write raise OverflowError
    if isinstance(idle_seal_seconds, bool) or not isinstance(idle_seal_seconds, (int, float)) \
            or not 0 <= idle_seal_seconds <= 1e9:
        raise InvalidArgument(f"idle_seal_seconds must be a number of seconds within 0..1e9 (0 disables idle "
                              f"sealing), got {idle_seal_seconds!r}")
    if isinstance(read_gap, bool) or not isinstance(read_gap, int) or not 0 <= read_gap <= (64 << 20):
        raise InvalidArgument(f"read_gap must be an int within 0..64 MiB, got {read_gap!r}")
    for name, value in (("remote_seal_seconds", remote_seal_seconds), ("remote_timeout", remote_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 86400:
            raise InvalidArgument(f"{name} must be a number of seconds within 0..86400, got {value!r}")
    return fs_path


def refuse_lost_manifest(path: str) -> None:
    """A folder without MANIFEST.json but with block files: a store whose MANIFEST was lost (a creation cut short
    leaves no block file: blocks are made only by an open store). Creating over it would reuse block ids and
    overwrite acknowledged data; a read-only open is told the same, not to pass create=True."""
    blocks_dir = os.path.join(path, BLOCKS_DIR)
    if os.path.isdir(blocks_dir) and any(n.endswith(".blk") for n in os.listdir(blocks_dir)):
        raise CorruptionError(f"{path!r} has block files but no {MANIFEST}: its MANIFEST was lost; "
                              f"`blockstore fsck --repair {path}` re-creates it from the block headers")


def make_store_dirs(path: str, backend: Backend) -> None:
    """Create a new store's folders (blocks/ and any missing parent), each durable before anything is
    put in it. Refuses block files without a MANIFEST."""
    refuse_lost_manifest(path)
    blocks_dir = os.path.join(path, BLOCKS_DIR)
    # Each directory made here is durable before anything is put in it: a new name survives a
    # power cut only once its parent directory is fsynced, and a store made at a new path was
    # otherwise lost whole (the next open then made an empty one; tests/power_loss.py).
    made = []
    d = os.path.abspath(blocks_dir)
    while not os.path.isdir(d):
        made.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(blocks_dir, exist_ok=True)
    except OSError as exc:  # a read-only or pseudo file system, no permission: the OSError left the hierarchy
        raise error_for_os(exc, f"create store {path!r}") from exc
    for d in made:  # bottom-up: each new directory's parent
        backend.dir_sync(os.path.dirname(d))


def announce_open(store: MeasuredStore, *, created: bool) -> None:
    """What an open tells the outside once it succeeded: its INFO line (created, clean, after recovery,
    or read-only; recovery logs what it did itself), and the store's metrics become scrapeable while it
    lives (blockstore.metrics.track: a weak reference, nothing counted on the hot path)."""
    report = store.recovery_report
    if created:
        how = "created"
    elif store.read_only:
        how = "opened read-only"
    elif report is not None:
        how = (f"opened after recovery ({len(report['scanned_blocks'])} block(s) scanned, "
               f"{report['dropped_entries']} entr(ies) dropped)")
    else:
        how = "opened clean"
    _log.info("%s: %s; durability %s, %d block(s)", store.path, how, store.durability, len(store.block_table()))
    metrics.track(store)
