"""Store statistics: what `Store.stats()` reports (space and write amplification among them)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from blockstore.directory import BlockEntry


@dataclass(frozen=True, slots=True)
class StoreStats:
    records: int
    live_bytes: int
    live_logical_bytes: int
    written_bytes: int
    blocks: int
    open_blocks: int
    block_file_bytes: int
    directory_bytes: int
    bytes_put: int
    bytes_appended: int
    space_amplification: float
    write_amplification: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


def measure(blocks: Sequence[BlockEntry], open_blocks: int, bytes_put: int, bytes_written: int,
            files: dict[int, str], dir_bytes: int) -> StoreStats:
    """The statistics of a block table snapshot, the block files on disk and the directory's size."""
    file_bytes = 0
    for p in files.values():
        try:
            file_bytes += os.path.getsize(p)
        except OSError:
            pass
    live_logical = sum(e.live_logical_bytes for e in blocks)
    return StoreStats(
        records=sum(e.live_records for e in blocks),
        live_bytes=sum(e.live_bytes for e in blocks),
        live_logical_bytes=live_logical,
        written_bytes=sum(e.written_bytes for e in blocks),
        blocks=len(files),
        open_blocks=open_blocks,
        block_file_bytes=file_bytes,
        directory_bytes=dir_bytes,
        bytes_put=bytes_put,
        bytes_appended=bytes_written,
        space_amplification=(file_bytes + dir_bytes) / live_logical if live_logical else 0.0,
        write_amplification=bytes_written / bytes_put if bytes_put else 0.0,
    )
