"""The chunk-record and tensor-record conveniences of `Store` (a base class of it): each method checks
nothing itself and delegates to chunks.py (ChunkRecords) or tensors.py (TensorRecords), which the Store
builds at open. Kept apart so store.py stays the core API (put/get/delete, observation, relocation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from blockstore.chunks import Chunk, ChunkRecords, ChunkWrite, session_partition
from blockstore.tensors import TensorRecords
from blockstore.validate import check_key as _check_key
from blockstore.validate import check_seq

DEFAULT_NAMESPACE = "default"


class RecordConveniences:
    """Chunk records (an agent's memories) and tensor records, over the Store's group commit and reads."""

    _chunks: ChunkRecords
    _tensors: TensorRecords

    @staticmethod
    def session_partition(user_id: str, session_id: str) -> bytes:
        """The `partition` (put_many, put_tensors) that writes KV records into the block stream of chunk
        session (user_id, session_id): a session's chunk and KV records then share blocks."""
        return session_partition(user_id, session_id)

    def put_chunk(self, user_id: str, session_id: str, chunk_id: str, text: str, *,
                  meta: Mapping[str, Any] | None = None, kv_keys: Sequence[bytes] = (),
                  ts_ns: int | None = None, ns: str = DEFAULT_NAMESPACE) -> None:
        """Write (or update: the old record becomes dead) one chunk record."""
        kv = tuple(check_seq("kv_keys", kv_keys, "bytes keys"))  # kv_keys=b"k" is not the keys 107 and so on
        self.put_chunks([ChunkWrite(user_id, session_id, chunk_id, text, meta, kv, ts_ns)], ns=ns)

    def put_chunks(self, chunks: Sequence[ChunkWrite], *, ns: str = DEFAULT_NAMESPACE) -> None:
        """Write many chunk records in one group commit (each record is atomic, the call is not: a
        failure part-way leaves a prefix). One call per chunk costs a directory write each; an agent
        saving a turn's memories, or an import, should batch them here."""
        self._chunks.put_chunks(chunks, ns=ns)

    def get_chunk(self, user_id: str, session_id: str, chunk_id: str, *, ns: str = DEFAULT_NAMESPACE) -> Chunk | None:
        return self.get_chunks([(user_id, session_id, chunk_id)], ns=ns)[0]

    def get_chunks(self, ids: Sequence[tuple[str, str, str]], *, ns: str = DEFAULT_NAMESPACE) -> list[Chunk | None]:
        """Batched read of chunk records (one request)."""
        return self._chunks.get_chunks(ids, ns=ns)

    def list_chunks(self, user_id: str, session_id: str, *, ns: str = DEFAULT_NAMESPACE) -> list[Chunk]:
        """A session's chunks in temporal order (timestamp, then chunk id)."""
        return self._chunks.list_chunks(user_id, session_id, ns=ns)

    def delete_chunk(self, user_id: str, session_id: str, chunk_id: str, *, ns: str = DEFAULT_NAMESPACE) -> bool:
        """Delete a chunk record (tombstone). Returns whether it existed."""
        return self._chunks.delete_chunk(user_id, session_id, chunk_id, ns=ns)

    def put_tensor(self, key: bytes, tensor: Any, *, ns: str = DEFAULT_NAMESPACE,
                   partition: bytes | str | None = None) -> None:
        self.put_tensors([(_check_key(key), tensor)], ns=ns, partition=partition)

    def put_tensors(self, items: Sequence[tuple[bytes, Any]], *, ns: str = DEFAULT_NAMESPACE,
                    partition: bytes | str | None = None) -> None:
        """Store tensors (numpy arrays, CPU torch tensors) next to each other (one partition, one batch)."""
        self._tensors.put_tensors(items, ns=ns, partition=partition)

    def get_tensor(self, key: bytes, *, ns: str = DEFAULT_NAMESPACE, out: Any = None) -> Any:
        return self.get_tensors([_check_key(key)], ns=ns, out=None if out is None else [out])[0]

    def get_tensors(self, keys: Sequence[bytes], *, ns: str = DEFAULT_NAMESPACE,
                    out: Sequence[Any] | None = None) -> list[Any]:
        """Read tensors (one request). With `out`, reads straight into the given tensors, which must
        match the stored dtype and shape; otherwise allocates them. None for a miss."""
        return self._tensors.get_tensors(keys, ns=ns, out=out)
