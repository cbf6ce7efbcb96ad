"""The I/O backend contract the engine is written against, and how one is chosen.

Two implementations: `native` (the C core, default) and `python` (the pure-Python twin, for the
benchmark and as a cross-check in tests). Select with `blockstore.open(..., backend="python")` or the
BLOCKSTORE_BACKEND environment variable.

When neither names one and the C core cannot be loaded (a wheel or build without it, a missing shared
library), the store runs on the Python backend, same format and same results, slower, and says so once
with a RuntimeWarning. Naming `native` (argument or BLOCKSTORE_BACKEND=native) makes a C core that does not
load an error instead: a deployment that asks for the fast path is told it does not have it.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from collections.abc import Sequence
from typing import Protocol

from blockstore.errors import BlockstoreError, InvalidArgument, IOErrorBS
from blockstore.records import (
    AppendRecord,
    BlockHeader,
    Footer,
    Placement,
    ReadRequest,
    RecordInfo,
    ScanResult,
)


class Backend(Protocol):
    name: str

    def last_errno(self) -> int: ...
    def xxh3(self, buf) -> int: ...  # type: ignore[no-untyped-def]
    def xxh3_many(self, bufs: Sequence) -> list[int]: ...  # type: ignore[type-arg]
    def decode_record(self, buf) -> RecordInfo: ...  # type: ignore[no-untyped-def]
    def encode_block_header(self, h: BlockHeader) -> bytes: ...
    def decode_block_header(self, buf) -> BlockHeader: ...  # type: ignore[no-untyped-def]
    def encode_footer(self, f: Footer) -> bytes: ...
    def decode_footer(self, buf) -> Footer: ...  # type: ignore[no-untyped-def]
    def open(self, path: str, create: bool) -> int: ...
    def open_ro(self, path: str) -> int: ...
    def close(self, fd: int) -> None: ...
    def sync(self, fd: int) -> None: ...
    def dir_sync(self, path: str) -> None: ...
    def truncate(self, fd: int, length: int) -> None: ...
    def unlink(self, path: str) -> None: ...
    def size(self, fd: int) -> int: ...
    def pread(self, fd: int, length: int, offset: int) -> bytes: ...
    def pwrite(self, fd: int, data: bytes, offset: int) -> None: ...
    def drop_cache(self, fd: int) -> None: ...
    def append(self, fd: int, offset: int, records: Sequence[AppendRecord], sync: bool) -> tuple[list[Placement], int]: ...
    def read_many(self, fd: int, reqs: Sequence[ReadRequest], max_gap: int, verify: bool,
                  willneed: bool = False) -> list[int]: ...
    def read_files(self, files: Sequence[tuple[int, Sequence[ReadRequest]]], max_gap: int, verify: bool,
                   willneed: bool = False) -> list[list[int]]: ...
    def scan(self, fd: int, start: int, end: int, verify_payload: bool) -> ScanResult: ...


ENV = "BLOCKSTORE_BACKEND"
NAMES = ("native", "python")

# Why the C core did not load, once known (None: not tried or loaded): the fallback warns once per process.
_native_failure: str | None = None


def _load_native() -> Backend:
    # imported here, not at the top: the C core is optional at run time (see the module docstring)
    from blockstore.native import NativeBackend

    return NativeBackend()


def _python() -> Backend:
    from blockstore.purepy import PythonBackend

    return PythonBackend()


def get_backend(name: str | None = None) -> Backend:
    """The backend `name` names, else BLOCKSTORE_BACKEND's, else the C core, falling back to Python."""
    global _native_failure
    chosen = name or os.environ.get(ENV)
    if chosen not in (None, "", *NAMES):
        source = "backend=" if name else f"${ENV}"  # the environment's value surprised callers who passed none
        raise InvalidArgument(f"unknown backend {chosen!r} (from {source}): expected 'native' or 'python'")
    if chosen == "python":
        return _python()
    try:
        return _load_native()
    except (ImportError, OSError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        if chosen == "native":
            raise BlockstoreError(f"the C core (blockstore._native) did not load ({why}); unset {ENV} or set "
                                  f"{ENV}=python to run on the pure-Python backend") from exc
        if _native_failure is None:
            warnings.warn(f"blockstore: the C core (blockstore._native) did not load ({why}); using the slower "
                          f"pure-Python backend. Set {ENV}=native to make this an error.", RuntimeWarning,
                          stacklevel=2)
        _native_failure = why
        return _python()


def refuse_special_file(path: str) -> None:
    """Raise IOErrorBS when `path` is a FIFO, socket or device: opening a FIFO for reading waits for a writer that
    never comes, so a FIFO in place of a block file hung every read of it, fsck and repair. A missing path or a
    folder is left to the open and the reads (NotFound, EISDIR)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise IOErrorBS(errno.EIO, f"open {path}: not a regular file (mode {stat.filemode(mode)})")
