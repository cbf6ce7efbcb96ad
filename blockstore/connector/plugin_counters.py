"""What the in-process plugin's `stats()` reports: one counter a field, and the lock the adding threads share.

A module of its own because the read path, the write path and the connector each add to the same totals from
their own threads; each is given this one object (`add` a batch's counts, `snapshot` for stats) instead of the
connector's lock.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, fields


@dataclass
class PluginCounters:
    put_calls: int = 0
    keys_written: int = 0
    bytes_written: int = 0
    duplicates_skipped: int = 0
    put_rejected: int = 0
    get_keys: int = 0
    hits: int = 0
    bytes_read: int = 0
    miss_absent: int = 0
    miss_layout: int = 0
    miss_corrupt: int = 0
    miss_no_memory: int = 0
    miss_error: int = 0
    removed: int = 0


class CounterTotals:
    """The connector's running totals: batches count into a `PluginCounters` of their own, then `add` it once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = PluginCounters()

    def add(self, batch: PluginCounters) -> None:
        with self._lock:
            for f in fields(PluginCounters):
                setattr(self._totals, f.name, getattr(self._totals, f.name) + getattr(batch, f.name))

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return asdict(self._totals)
