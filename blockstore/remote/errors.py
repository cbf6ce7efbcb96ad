"""The remote tier's errors, inside the BlockstoreError hierarchy (a corrupt object is the engine's own
ChecksumMismatch / CorruptionError, raised by the same record checks as a local read)."""

from __future__ import annotations

from blockstore.errors import BlockstoreError, IOErrorBS


class RemoteError(BlockstoreError):
    """A remote-tier failure that is not the object store being unreachable (bad settings, a missing
    object the index names)."""


class RemoteUnavailable(IOErrorBS):
    """The object store did not answer (connection refused, timeout, 5xx after retries): nothing was
    lost, the work stays pending and is retried."""


class RemoteObjectMissing(RemoteError):
    """The object a pointer names is not in the bucket (reclaimed by remote GC after its grace period, or
    lost): a pool re-polls, which moves or drops the pointer, and never returns bytes for it."""
