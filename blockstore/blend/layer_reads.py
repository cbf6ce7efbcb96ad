"""One C call per layer: the chunk-KV loader's read of one layer of every chunk of a prompt.

A layer of a blended prompt is one record in each of its chunks' blocks (seven 2 MiB records at 4k tokens
of an 8B model). Through `Store.read_located` each block is its own C call, with Python between them:
lookups of file descriptors, pins, request objects, status checks. On a GPU host the thread issuing the
blend's GPU ops holds the GIL almost all the time, and a loader thread coming back from a C read waits
for it (up to the interpreter's switch interval, 5 ms) once per block. Here the blocks are pinned and
their descriptors taken once per prompt, so a layer's read is one `bs_read_files` call that reads and
verifies every record of the layer with the GIL released, and the loader needs the GIL about once a
layer. With the store's `read_ahead`, a cold layer's records are announced together before the first
read; cached ones are not announced (no syscalls a warm read does not need).

Same guarantees as `read_located`: every payload's xxh3 is checked before the caller sees it, a
mismatch raises `ChecksumMismatch`, and the blocks cannot be deleted while pinned. When this path
cannot serve (a block whose local copy the remote tier dropped, a block
compaction deleted after the lookup, a plan over more blocks than the reader reads at once:
`READ_BLOCKS_AT_ONCE`, a descriptor each) `LayerReads.open` returns None and the loader reads through
`read_located`, which handles each of those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from blockstore.errors import ChecksumMismatch, error_for_code
from blockstore.reader import READ_BLOCKS_AT_ONCE
from blockstore.records import ReadRequest
from blockstore.store import Store

# bytes between records that a read may read through rather than split (as Store's read_gap)
_MAX_GAP = 0


class LayerReads:
    """Reads of one layer's records of a fixed set of chunks, one C call a layer. `files[layer]`: (fd,
    [(index of the chunk, record location)]) per block, records in offset order."""

    def __init__(self, store: Store, pins: contextlib.ExitStack, layout: list[list[tuple[int, list[tuple[int, Any]]]]],
                 keys: list[list[bytes]]) -> None:
        self.store, self._pins, self._files, self._keys = store, pins, layout, keys

    @classmethod
    def open(cls, store: Store, plan: Sequence[Any], layers: range) -> LayerReads | None:
        """Pin every block the plan's layer records are in and take their descriptors; None when this
        path cannot serve the plan (see the module's docstring)."""
        if not plan or not layers:
            return None
        blocks = {p.locs[layer].block_id for p in plan for layer in layers}
        if len(blocks) > READ_BLOCKS_AT_ONCE:  # a descriptor held per block for the stream's life: past the
            return None  # reader's group size, read_located (a block at a time) cannot run out of them
        pins = contextlib.ExitStack()
        pins.enter_context(store.hold_blocks(sorted(blocks)))
        try:
            held = {bid: store.block_read_fd(bid) for bid in blocks}
        except BaseException:  # a block file that cannot be opened (not a regular file, EMFILE): let go of the pins
            pins.close()
            raise
        fds = {bid: fd for bid, fd in held.items() if fd is not None}
        if len(fds) < len(held):  # deleted since the lookup, or dropped to the remote tier: read_located copes
            pins.close()
            return None
        files: list[list[tuple[int, list[tuple[int, Any]]]]] = []
        keys: list[list[bytes]] = []
        for layer in range(max(layers) + 1):
            if layer not in layers:
                files.append([])
                keys.append([])
                continue
            by_block: dict[int, list[tuple[int, Any]]] = {}
            for i, p in enumerate(plan):
                by_block.setdefault(p.locs[layer].block_id, []).append((i, p.locs[layer]))
            files.append([(fds[bid], sorted(recs, key=lambda r: r[1].offset)) for bid, recs in by_block.items()])
            keys.append([p.keys[layer] for p in plan])
        return cls(store, pins, files, keys)

    def requests(self, layer: int, dsts: Sequence[Any]) -> list[tuple[int, list[ReadRequest]]]:
        """Layer `layer`'s reads as `read_files` takes them: chunk i's record into dsts[i] (a writable
        buffer of its payload's size)."""
        return [(fd, [ReadRequest(loc.payload_offset, loc.payload_len, dsts[i], loc.payload_xxh3) for i, loc in recs])
                for fd, recs in self._files[layer]]

    def check(self, layer: int, statuses: Sequence[Sequence[int]], errno: int) -> None:
        """Raise the first failure among a layer's per-request statuses (as `read_files` returns them)."""
        for (_fd, recs), codes in zip(self._files[layer], statuses):
            for (i, loc), code in zip(recs, codes):
                if code:
                    err = error_for_code(code, f"read of chunk KV key {self._keys[layer][i]!r} in block "
                                         f"{loc.block_id:016x}", errno)
                    if isinstance(err, ChecksumMismatch):
                        err = ChecksumMismatch(f"{err}: payload does not match its checksum; not returned")
                    raise err

    def read_layer(self, layer: int, dsts: Sequence[Any]) -> None:
        """Layer `layer`'s record of chunk i into dsts[i] (a writable buffer of its payload's size),
        each verified; raises on any failure (nothing partly read is handed on)."""
        # read_ahead: records of blocks not in the page cache are announced first (a cold prompt's layer is
        # then in flight at once); cached ones are not (native/multi.c)
        statuses = self.store.backend.read_files(self.requests(layer, dsts), _MAX_GAP, True, self.store.read_ahead)
        self.check(layer, statuses, self.store.backend.last_errno())

    def close(self) -> None:
        """Unpin the blocks (a deletion that waited for them goes ahead)."""
        self._pins.close()
