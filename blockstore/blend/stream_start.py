"""When a blend starts its chunk loader: once the full layers before the check layer are issued.

Starting the loader (`LayerStream`: the blocks pinned and their descriptors taken, every layer's reads
planned, the host and device buffers taken, the reader threads started) costs the thread that issues the
GPU's work a few milliseconds. Started first, as it was, that time came before the GPU had anything to do:
on an H100 (8B shape, 4k tokens, warm) the GPU reached the check layer ~3 ms after the host asked for it.
Started once the full layers and the check layer's projections are issued, it runs while the GPU computes
them, and the first layer the blend needs (the check layer's, read by every reader at once) is in well
before the GPU gets there. A prompt with chunks not stored starts it before their prefill instead, which the
stored chunks' reads then overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blockstore.blend.chunk_kv import ChunkKVStore, LayerStream, Located


class LateStream:
    """A prompt's loader, made on the first `start()` (None when nothing is to be streamed: `located` None);
    `close()` closes it if it was made."""

    def __init__(self, kv: ChunkKVStore, located: Sequence[Located | None] | None, device: torch.device,
                 first_layer: int, readers: int | None) -> None:
        self._kv, self._located, self._device = kv, located, device
        self._first_layer, self._readers = first_layer, readers
        self.stream: LayerStream | None = None

    def start(self) -> LayerStream | None:
        if self.stream is None and self._located is not None:
            self.stream = self._kv.stream_located(list(self._located), device=self._device,
                                                  first_layer=self._first_layer, readers=self._readers)
        return self.stream

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
