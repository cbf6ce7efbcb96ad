"""A prompt's chunk KV, layer by layer, read by reader threads that run no Python.

On a GPU host the thread issuing the blend's GPU ops holds the GIL almost all the time. A loader thread
that needs the GIL between its reads (to claim the next layer, start a host-to-device copy, wait for it,
mark the layer ready) waits for it, up to the interpreter's switch interval (5 ms) each time, and every
switch also takes the GIL from the op-issuing thread: more readers read faster alone but slowed a warm 4k
blend down (bench/README.md, "what bounds the 4k blend"). Here each reader thread makes one C call
(`native/layers.c`) that claims parts (a layer's records in one block file) layer after layer in order,
reads and verifies each into one host buffer (pinned on a GPU host); the reader of a layer's last part
publishes the layer; the caller, when it wants a layer, starts the host-to-device
copies of every layer read so far on a side stream (copies are in layer order) and makes its own stream
wait for that layer's copy: no host sync, and the readers never need the GIL until they return.

Same guarantees as `LayerReads.read_layer`: each payload's xxh3 is checked before the caller sees it, and
a failed layer raises at that layer (`LayerReads.check`); no layer after it is handed on (parts no reader
had claimed yet are not read). On a GPU the host buffer is pinned and holds every layer of the prompt (torch's
caching host allocator keeps it for reuse), where the Python readers pinned one slot per reader.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from blockstore.blend.layer_reads import LayerReads
from blockstore.errors import BlockstoreError, InvalidArgument
from blockstore.reader import aligned_buffer

_MAX_GAP = 0  # as LayerReads: records are read exactly, nothing between them


class LayerLoader:
    """Layers `layers` of a plan read into one host buffer by `readers` C readers; `layer(l)` gives layer
    l's bytes (`offsets`/`lens` place chunk i's record in a layer's row), on `device`."""

    def __init__(self, reads: LayerReads, layers: range, offsets: Sequence[int], lens: Sequence[int],
                 device: torch.device, readers: int) -> None:
        self._reads, self._layers, self._device = reads, layers, device
        row = offsets[-1]
        cuda = device.type == "cuda"
        # one buffer for every layer: its rows are what the readers write and (on a GPU) what the copies read
        self._host = (torch.empty((len(layers), row), dtype=torch.uint8, pin_memory=True) if cuda else
                      torch.frombuffer(aligned_buffer(len(layers) * row), dtype=torch.uint8).view(len(layers), row))
        self._dev = torch.empty((len(layers), row), dtype=torch.uint8, device=device) if cuda else None
        raw = self._host.numpy()
        specs = [reads.requests(layer, [raw[j, offsets[i] : offsets[i] + lens[i]].data for i in range(len(lens))])
                 for j, layer in enumerate(layers)]
        # the native backend's alone (wanted() checks it): not part of the Backend protocol
        jobs = reads.store.backend.layer_jobs(specs, _MAX_GAP, True, reads.store.read_ahead)  # type: ignore[attr-defined]
        if jobs is None:
            raise BlockstoreError("the C core has no layer readers (bs_layer_read); rebuild it")
        self._jobs = jobs
        self._side: torch.cuda.Stream | None = None
        self._copied: list[torch.cuda.Event | None] = [None] * len(layers)
        self._next = 0  # the first layer (index into `layers`) not handed on yet: copied, or checked on a CPU
        self._error: BaseException | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []
        try:  # a failure here (a thread's start) stops the readers started and unlends the buffers
            self._side = torch.cuda.Stream(device) if cuda else None
            if self._side is not None:  # self._dev's memory may still be read by work queued on the caller's stream
                self._side.wait_stream(torch.cuda.current_stream(device))
            for i in range(max(1, min(readers, len(layers)))):
                t = threading.Thread(target=self._read, name=f"blend-reader-{i}", daemon=True)
                t.start()
                self._threads.append(t)  # started ones only: close() joins them
        except BaseException:
            self.close()
            raise

    @classmethod
    def wanted(cls, reads: LayerReads | None) -> bool:
        """Whether this loader can serve: the one-call reads are open and the C core has layer readers."""
        return reads is not None and bool(getattr(reads.store.backend, "has_layer_readers", False))

    def _read(self) -> None:
        try:
            self._jobs.run()
        except BaseException as exc:  # a whole-call failure: handed to the caller's next layer()
            self._error = exc
            self._jobs.cancel()

    def _hand_on(self, j: int) -> None:
        """Layer index j is read: raise its failure, or start its copy to the device."""
        statuses = self._jobs.wait(j)
        if statuses is None:  # cancelled: an earlier layer failed, or a reader's call did
            raise self._error if self._error is not None else BlockstoreError("chunk KV loader stopped")
        self._reads.check(self._layers[j], statuses, self._jobs.errno(j))
        if self._side is not None and self._dev is not None:
            with torch.cuda.stream(self._side):
                self._dev[j].copy_(self._host[j], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._side)
            self._copied[j] = done
        self._next = j + 1

    def layer(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s bytes, ready for work queued on the caller's current stream from now on."""
        if layer not in self._layers:
            raise InvalidArgument(f"layer {layer} is not loaded by this stream (layers {self._layers.start}.."
                                  f"{self._layers.stop - 1})")
        j = layer - self._layers.start
        while self._next < len(self._layers) and (self._next <= j or self._jobs.done(self._next)):
            self._hand_on(self._next)  # waits (GIL released) only for layers up to j; later ones if read well
        if self._dev is None:
            return self._host[j]
        event = self._copied[j]
        assert event is not None
        torch.cuda.current_stream(self._device).wait_event(event)
        return self._dev[j]

    def close(self) -> None:
        """Stop the readers (unclaimed layers are not read), wait for them and for the copies, unlend.
        Idempotent; the buffers stay until the loader is dropped."""
        if self._closed:
            return
        self._closed = True
        self._jobs.cancel()
        for t in self._threads:
            t.join()
        if self._side is not None:
            self._side.synchronize()  # no copy may read the host buffer once it is given back
        self._jobs.close()
