"""The object-store tier (issue 18): sealed blocks uploaded to any S3-compatible store, read back by
ranged GETs verified like any read, and a pool through which every node finds what the others sealed.

A plugin: it uses the Store's public API only (`block_table`, `namespaces`, `namespace_id`, the block
files of sealed blocks, which are immutable and only read here), and the engine never imports it.
docs/remote.md says what exists, what survives the loss of a node, and what the engine still has to
grow (seal notification, a read fallback for dropped blocks, a `remote` durability mode). Remote GC
(`Reclaimer`) deletes an object only a grace period after every pool was told it is superseded. A node whose
disk was lost is restored from its block objects (`restore_node`; `python -m blockstore.remote.restore`)."""

from blockstore.remote.errors import RemoteError, RemoteObjectMissing, RemoteUnavailable
from blockstore.remote.layout import IndexEntry
from blockstore.remote.objects import ObjectStore, S3Settings, make_object_store
from blockstore.remote.pool import RemotePool
from blockstore.remote.reader import RemoteReader
from blockstore.remote.reclaim import Reclaimer, ReclaimStatus
from blockstore.remote.restoring import RestoreError, RestoreResult, restore_node
from blockstore.remote.tier import RemoteTier, TierStatus
from blockstore.remote.uploader import Uploader, UploadStatus

__all__ = [
    "IndexEntry", "ObjectStore", "ReclaimStatus", "Reclaimer", "RemoteError", "RemoteObjectMissing", "RemotePool",
    "RemoteReader", "RemoteTier", "RemoteUnavailable", "RestoreError", "RestoreResult", "S3Settings", "TierStatus",
    "Uploader", "UploadStatus", "make_object_store", "restore_node",
]
