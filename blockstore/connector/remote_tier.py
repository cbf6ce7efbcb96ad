"""LMCache across nodes: the blockstore L2 adapter with the object-store tier (issue 18). Each `lmcache server`
keeps its own store on its own disk and shares one bucket with the others: its sealed blocks are uploaded
(with their key index) by a background thread, a second thread polls the other nodes' indexes into a local
pool, and a lookup or load that misses the local store is answered from the pool by verified ranged GETs.
The uploads are blockstore.remote.RemoteTier's (backoff while the store is unreachable, optional local
capacity); this module adds the pool, sealing of idle blocks, remote GC and the adapter's fallback.
So a prompt stored through one server is a hit through any other.

    --l2-adapter '{"type": "plugin", "module_path": "blockstore.connector.remote_tier",
                   "class_name": "RemoteTierL2Adapter",
                   "adapter_params": {"path": "/data/kv", "remote": {"endpoint": "http://s3:8333",
                       "bucket": "kv", "access_key": "...", "secret_key": "...", "node_id": "node-a"}}}'

Everything else in `adapter_params` is the blockstore adapter's (l2_adapter.py). A record read from the pool
is checked like a local one: the engine's record decoder and xxh3 (blockstore.remote), and the adapter's
layout fingerprint in the record's meta against the buffer LMCache hands in; a mismatch is a miss. Records
read from the pool are not copied into the local store (that node would upload them again: the bucket would
hold them twice); LMCache's L1 keeps them while they are hot."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.api import ObjectKey

from blockstore.connector.l2_adapter import BlockstoreL2Adapter, BlockstoreL2AdapterConfig
from blockstore.connector.l2_keys import group_by_namespace, layout_fingerprint
from blockstore.directory import BLOCK_SEALED
from blockstore.errors import BlockstoreError, InvalidArgument
from blockstore.remote import Reclaimer, RemoteError, RemotePool, S3Settings, make_object_store
from blockstore.remote.layout import check_node_id
from blockstore.remote.tier import RemoteTier
from blockstore.store import Store

if TYPE_CHECKING:
    from lmcache.v1.distributed.internal_api import L1MemoryDesc
    from lmcache.v1.memory_management import MemoryObj

_log = logging.getLogger("blockstore.connector.remote_tier")
POOL_DIR = "remote-pool"  # under the store's folder, beside the uploader's remote-ledger


@dataclass(frozen=True)
class RemoteTierConfig:
    """The `remote` object of `adapter_params`."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    node_id: str  # unique per server: names its objects in the bucket
    region: str = "us-east-1"
    client: str = "obstore"  # or "boto3" (bench/remote.py measures both)
    upload_interval_s: float = 1.0  # upload pass at least this often (and on every seal)
    poll_interval_s: float = 1.0  # other nodes' records become hits here within about this long
    seal_after_s: float = 2.0  # seal an open block idle this long, so what was stored gets uploaded
    timeout_s: float = 30.0
    retries: int = 3
    gc_grace_s: float | None = None  # remote GC (blockstore.remote.Reclaimer) with this grace; None: off
    local_capacity_bytes: int | None = None  # drop uploaded blocks' local copies above this (RemoteTier)

    def __post_init__(self) -> None:
        for name in ("endpoint", "bucket", "access_key", "secret_key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidArgument(f"blockstore adapter_params.remote: {name!r} must be a non-empty string")
        try:
            check_node_id(self.node_id)
        except RemoteError as exc:
            raise InvalidArgument(f"blockstore adapter_params.remote: {exc}") from None
        # bounded: inf (JSON's 1e999) passed `> 0`, and the pool thread then died at its first wait (OverflowError):
        # no more polling of other nodes, no idle sealing, so stored KV was never uploaded
        for name, most in (("upload_interval_s", 86400), ("poll_interval_s", 86400), ("seal_after_s", 86400),
                           ("timeout_s", 3600)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= most:
                raise InvalidArgument(f"blockstore adapter_params.remote: {name!r} must be a number of seconds in "
                                      f"(0, {most}], got {v!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not 0 <= self.retries <= 100:
            raise InvalidArgument(f"blockstore adapter_params.remote: 'retries' must be an integer in 0..100, "
                                  f"got {self.retries!r}")
        grace, cap = self.gc_grace_s, self.local_capacity_bytes
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 < grace < math.inf):
            raise InvalidArgument(f"blockstore adapter_params.remote: 'gc_grace_s' must be a number of seconds > 0 or "
                                  f"null (off), got {grace!r}")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise InvalidArgument(f"blockstore adapter_params.remote: 'local_capacity_bytes' must be an integer >= 0 "
                                  f"or null, got {cap!r}")
        if self.client not in ("obstore", "boto3"):
            raise InvalidArgument(f"blockstore adapter_params.remote: 'client' must be 'obstore' or 'boto3', "
                                  f"got {self.client!r}")

    @classmethod
    def from_dict(cls, d: Any) -> RemoteTierConfig:
        if not isinstance(d, dict):
            raise InvalidArgument(f"blockstore adapter_params.remote must be a JSON object, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known), key=str)
        if unknown:
            raise InvalidArgument(f"blockstore adapter_params.remote: unknown key(s) {unknown}; known: {known}")
        missing = [n for n in ("endpoint", "bucket", "access_key", "secret_key", "node_id") if n not in d]
        if missing:
            raise InvalidArgument(f"blockstore adapter_params.remote: missing {missing}")
        return cls(**d)

    def settings(self) -> S3Settings:
        return S3Settings(self.endpoint, self.bucket, self.access_key, self.secret_key, self.region,
                          timeout_s=float(self.timeout_s), retries=self.retries)


@dataclass(frozen=True)
class RemoteTierL2AdapterConfig(BlockstoreL2AdapterConfig):
    """The blockstore adapter's `adapter_params` plus `remote` (required)."""

    FIELDS: ClassVar[tuple[str, ...]] = (*BlockstoreL2AdapterConfig.FIELDS, "remote")

    remote: RemoteTierConfig | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.remote is None:
            raise InvalidArgument("blockstore adapter_params: 'remote' (the shared bucket) is required by "
                                  "RemoteTierL2Adapter; use BlockstoreL2Adapter for a local-only tier")
        if not isinstance(self.remote, RemoteTierConfig):
            object.__setattr__(self, "remote", RemoteTierConfig.from_dict(self.remote))

    @classmethod
    def help(cls) -> str:
        return (BlockstoreL2AdapterConfig.help() + "\nRemoteTierL2Adapter (module_path "
                "'blockstore.connector.remote_tier') adds 'remote' (required): endpoint, bucket, access_key, "
                "secret_key, node_id (unique per server), region, client ('obstore' | 'boto3'), upload_interval_s, "
                "poll_interval_s, seal_after_s (an open block idle this long is sealed and uploaded), timeout_s, "
                "retries, gc_grace_s (remote GC of this node's superseded objects; null = off), local_capacity_bytes "
                "(drop uploaded blocks' local copies above this; their reads become ranged GETs)")


class SharedPool:
    """One store's place in the shared bucket: blockstore.remote.RemoteTier uploads its sealed blocks (on its own
    thread, woken by seals, with backoff while the store is unreachable); this class's thread polls the other
    nodes' indexes, seals an open block once it has been idle `seal_after_s` (so what was stored is uploaded
    without waiting for the block to fill) and runs remote GC; `read` answers a local miss from the pool."""

    def __init__(self, store: Store, cfg: RemoteTierConfig) -> None:
        self.store, self.cfg = store, cfg
        self.objects = make_object_store(cfg.settings(), cfg.client)
        self.tier = RemoteTier(store, self.objects, cfg.node_id, poll_s=cfg.upload_interval_s,
                               local_capacity_bytes=cfg.local_capacity_bytes)
        try:
            self.pool = RemotePool(self.objects, os.path.join(store.path, POOL_DIR))
            self.reclaimer = None if cfg.gc_grace_s is None else Reclaimer(
                self.tier.uploader, grace_s=cfg.gc_grace_s, max_poll_interval_s=cfg.poll_interval_s)
        except BaseException:
            self.tier.close(drain=False)
            raise
        self.last_error: str | None = None
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blockstore-remote-pool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pass_once()
            self._stop.wait(self.cfg.poll_interval_s)

    def pass_once(self) -> None:
        """Poll, seal what has been idle long enough, reclaim; an error is kept for status (what it could not
        do stays to do, and the next pass retries it)."""
        try:
            self.pool.poll()
            self.polls += 1
            now = time.time_ns()
            if any(e.state != BLOCK_SEALED and e.total_records and now - e.last_append_ns >= self.cfg.seal_after_s * 1e9
                   for e in self.store.block_table()):
                self.store.seal_open_blocks()  # its seal observer wakes the tier's uploader
            self.last_error = None if self.reclaimer is None else self.reclaimer.run_once().last_error
        except Exception as exc:  # a background loop: kept for status and retried, never the thread's end
            self.last_error = f"{type(exc).__name__}: {exc}"
            _log.warning("blockstore remote pool: pass failed: %s", exc)

    def contains(self, ns: str, kbs: list[bytes]) -> list[bool]:
        return [e is not None for e in self.pool.locate_many(kbs, ns=ns)]

    def read(self, ns: str, kbs: list[bytes]) -> list[tuple[memoryview, bytes] | None]:
        return self.pool.read_records(kbs, ns=ns)

    def status(self) -> dict[str, Any]:
        up = self.tier.status()
        return {"node_id": self.cfg.node_id, "uploaded_blocks": up.uploaded_blocks,
                "pending_blocks": len(up.pending_blocks), "pending_bytes": up.pending_bytes,
                "dropped_local_blocks": up.dropped_blocks, "pool_objects_ingested": self.pool.ingested_objects,
                "polls": self.polls, "last_error": {"upload": up.last_error, "pool": self.last_error}}

    def close(self) -> None:
        """Stop polling, then the tier (which seals what is open and uploads it, a bounded wait)."""
        self._stop.set()
        self._thread.join()
        self.tier.close(timeout=self.cfg.timeout_s)
        self.pool.close()
        if self.reclaimer is not None:
            self.reclaimer.close()


class RemoteTierL2Adapter(BlockstoreL2Adapter):
    """BlockstoreL2Adapter whose local misses fall back to the shared pool (lookups and loads)."""

    config_class_name = "RemoteTierL2AdapterConfig"

    def __init__(self, config: RemoteTierL2AdapterConfig | dict[str, Any],
                 l1_memory_desc: L1MemoryDesc | None = None) -> None:
        if not isinstance(config, RemoteTierL2AdapterConfig):
            config = RemoteTierL2AdapterConfig.from_dict(config)
        super().__init__(config, l1_memory_desc)
        assert isinstance(config.remote, RemoteTierConfig)
        self._remote_counts = {"lookup_hits": 0, "load_hits": 0, "load_bytes": 0, "load_miss_layout": 0,
                               "load_errors": 0}
        try:
            self.remote = SharedPool(self.store, config.remote)
        except BaseException:
            super().close()
            raise

    def _run_lookup(self, keys: list[ObjectKey]) -> Bitmap:
        bitmap = super()._run_lookup(keys)
        groups, _bad = group_by_namespace(keys)
        hits = 0
        for ns, items in groups.items():
            todo = [(i, kb) for i, kb in items if not bitmap.test(i)]
            if todo:
                for (i, _kb), there in zip(todo, self.remote.contains(ns, [kb for _, kb in todo])):
                    if there:
                        bitmap.set(i)
                        hits += 1
        with self._state.lock:
            self._remote_counts["lookup_hits"] += hits
        return bitmap

    def _run_load(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> Bitmap:
        bitmap = super()._run_load(keys, objects)
        if len(keys) != len(objects):
            return bitmap
        groups, _bad = group_by_namespace(keys)
        for ns, items in groups.items():
            todo = [(i, kb) for i, kb in items if not bitmap.test(i)]
            if todo:
                self._load_remote(ns, todo, objects, bitmap)
        return bitmap

    def _load_remote(self, ns: str, todo: list[tuple[int, bytes]], objects: list[MemoryObj], bitmap: Bitmap) -> None:
        counts = {"load_hits": 0, "load_bytes": 0, "load_miss_layout": 0, "load_errors": 0}
        try:
            got = self.remote.read(ns, [kb for _, kb in todo])
        except BlockstoreError as exc:  # unreachable, corrupt: a miss, LMCache recomputes
            _log.warning("blockstore L2: remote load from %s failed: %s", ns, exc)
            got, counts["load_errors"] = [None] * len(todo), len(todo)
        for (i, _kb), rec in zip(todo, got):
            if rec is None:
                continue
            payload, meta = rec
            obj = objects[i]
            if meta != layout_fingerprint(obj) or len(payload) != obj.get_size():
                counts["load_miss_layout"] += 1  # another layout's record: never copied into this buffer
                continue
            memoryview(obj.byte_array).cast("B")[: len(payload)] = payload
            bitmap.set(i)
            counts["load_hits"] += 1
            counts["load_bytes"] += len(payload)
        with self._state.lock:
            for k, v in counts.items():
                self._remote_counts[k] += v

    def report_status(self) -> dict[str, Any]:
        """The blockstore adapter's status plus `remote`: this node's uploads, the pool, the remote hits.
        Never raises (the server does not catch)."""
        status = super().report_status()
        with self._state.lock:
            counts = dict(self._remote_counts)
        try:
            status["remote"] = {**self.remote.status(), **counts}
        except Exception as exc:
            status["remote"] = {**counts, "error": f"{type(exc).__name__}: {exc}"}
        return status

    def close(self) -> None:
        remote = getattr(self, "remote", None)
        if remote is not None and not self._state.closed:
            remote.close()
        super().close()
