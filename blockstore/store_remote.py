"""The remote tier's seams on `Store` (a base class of it; docs/remote.md): seal observers, sealing on
demand, the remote flag, dropping a confirmed block's local copy and the read fallback's fetcher. Each
method checks its arguments and delegates to tiering.py (or the reader); blockstore.remote uses them."""

from __future__ import annotations

from collections.abc import Callable

from blockstore.errors import InvalidArgument
from blockstore.reader import Reader
from blockstore.tiering import BlockFetcher, Tiering
from blockstore.validate import check_block_id
from blockstore.writer import WriteEngine


class RemoteSeams:
    """What an object-store tier needs of a store, and nothing it could use to lose data: a local copy
    goes only once its block is flagged remote."""

    _tiering: Tiering
    _reader: Reader
    _engine: WriteEngine
    _check_open: Callable[..., None]

    def add_seal_observer(self, observe: Callable[[int], None]) -> None:
        """Call `observe(block_id)` once a block's seal is committed (footer written, table entry sealed;
        synced in `sync` and `remote` modes). Runs on the writer's thread: keep it cheap (the remote tier
        only wakes its uploader); exceptions are logged, never raised into the write."""
        if not callable(observe):
            raise InvalidArgument(f"observe must be callable, not {type(observe).__name__}")
        self._tiering.seal_observers.append(observe)

    def remove_seal_observer(self, observe: Callable[[int], None]) -> None:
        if observe in self._tiering.seal_observers:
            self._tiering.seal_observers.remove(observe)

    def seal_open_blocks(self) -> list[int]:
        """Seal every open block now (one synced directory write), whatever its size and age, so the
        remote tier can upload it; returns the blocks sealed. Writes continue in new blocks."""
        return self._engine.seal_open_blocks(1 << 63)

    def mark_block_remote(self, block_id: int, name: bytes) -> bool:
        """Record, in one synced directory write, that object `name` holds sealed block `block_id` (the
        remote tier calls it after the object's index PUT). False if the block no longer exists."""
        self._check_open(write=True)
        return self._tiering.mark_remote(check_block_id(block_id), name)

    def drop_local_copy(self, block_id: int) -> int:
        """Delete a sealed block's local file, keeping it in the table: its records are then read from its
        object (set_block_fetcher). Refuses (InvalidArgument) a block not marked remote. Returns bytes freed."""
        self._check_open(write=True)
        return self._tiering.drop_local_copy(check_block_id(block_id))

    def restore_local_copy(self, block_id: int, data: bytes | bytearray | memoryview) -> bool:
        """Put a dropped block's file back from its object's bytes (checked to be that block's sealed
        file; reads then go to the local disk again). False if the block is gone or its file is there."""
        self._check_open(write=True)
        return self._tiering.restore_local_copy(check_block_id(block_id), data)

    def has_local_copy(self, block_id: int) -> bool:
        return self._tiering.has_local_copy(check_block_id(block_id))

    def set_block_fetcher(self, fetch: BlockFetcher | None) -> None:
        """The read fallback: `fetch(block_id, remote_name, [(start, end), ...])` returns those byte ranges
        of a block file whose local copy was dropped (ranges coalesced as the local read coalesces);
        every payload is then checked against its xxh3, as a local read is. None detaches it."""
        if fetch is not None and not callable(fetch):
            raise InvalidArgument(f"fetch must be callable or None, not {type(fetch).__name__}")
        self._reader.fetch = fetch
