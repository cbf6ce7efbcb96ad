"""The I/O backend contract the engine is written against, and how one is chosen.

Two implementations: `native` (the C core, default) and `python` (the pure-Python twin, for the
benchmark and as a cross-check in tests). Select with `blockstore.open(..., backend="python")` or the
BLOCKSTORE_BACKEND environment variable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from blockstore.errors import InvalidArgument
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
    def scan(self, fd: int, start: int, end: int, verify_payload: bool) -> ScanResult: ...


def get_backend(name: str | None = None) -> Backend:
    name = name or os.environ.get("BLOCKSTORE_BACKEND") or "native"
    if name == "native":
        from blockstore.native import NativeBackend

        return NativeBackend()
    if name == "python":
        from blockstore.purepy import PythonBackend

        return PythonBackend()
    raise InvalidArgument(f"unknown backend {name!r}: expected 'native' or 'python'")
