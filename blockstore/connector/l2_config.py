"""The L2 adapter's configuration: `BlockstoreL2AdapterConfig` (LMCache builds it from `adapter_params` and finds
it by name in the adapter's module, which re-exports it) and the bounds a capacity must keep
(`check_capacity_fits`, `RECORD_FRAMING`, `record_bytes`).

A module of its own because it is the one validator of the public config keys: it runs before any store is
opened (LMCache validates the JSON first), and the shared-bucket tier (`remote_tier.py`) extends it. It
imports compaction only to check a policy by name, and no other part of the adapter.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase

from blockstore.compaction import disabled, resolve
from blockstore.connector.eviction import ADMISSION
from blockstore.errors import InvalidArgument
from blockstore.manifest import valid_block_size

_DEFAULT_COMPACTION = "full"

@dataclass(frozen=True)
class BlockstoreL2AdapterConfig(L2AdapterConfigBase):
    """`adapter_params` of the blockstore L2 adapter (see `help()`). Validated by `__post_init__`, however it is
    built (directly, `from_dict`, `dataclasses.replace`): a bad value raises blockstore's `InvalidArgument` (a
    ValueError) naming the field. Frozen, so a validated config stays valid."""

    FIELDS: ClassVar[tuple[str, ...]] = ("path", "durability", "block_size", "capacity_bytes", "compaction",
                                         "workers", "lock_ttl_s", "admission", "metrics_port")

    path: str
    _: KW_ONLY
    durability: str = "cache"
    block_size: int | None = None
    capacity_bytes: int = 0
    compaction: str | dict[str, Any] | None = _DEFAULT_COMPACTION
    workers: int = 4
    lock_ttl_s: float = 600.0
    admission: str = "always"
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        """The one validator (normalizes compaction False/'none'/'off' to None and lock_ttl_s to a float)."""
        def bad(name: str, why: str) -> InvalidArgument:
            return InvalidArgument(f"blockstore adapter_params: {name!r} {why}")

        path = self.path
        if not isinstance(path, str) or not path.strip():
            raise bad("path", f"(the store directory) is required, a non-empty string, got {path!r}")
        if self.durability not in ("cache", "sync"):
            raise bad("durability", f"must be 'cache' or 'sync', got {self.durability!r}")
        block_size = self.block_size
        if block_size is not None and not valid_block_size(block_size):
            raise bad("block_size", "must be an integer number of bytes between 65536 (64 KiB) and 2**40 (1 TiB), "
                      f"got {block_size!r}")
        if not _is_int(self.capacity_bytes) or self.capacity_bytes < 0:
            raise bad("capacity_bytes", f"must be an integer >= 0 (0 = unbounded), got {self.capacity_bytes!r}")
        if self.capacity_bytes and block_size is not None:
            check_capacity_fits(self.capacity_bytes, block_size)
        if self.admission not in ADMISSION:
            raise bad("admission", f"must be one of {list(ADMISSION)}, got {self.admission!r}")
        compaction = self.compaction
        if disabled(compaction):
            compaction = None
        if compaction is not None:
            spec = compaction
            if isinstance(spec, dict):  # "background" is attach()'s switch, not a policy knob
                compaction = dict(spec)  # a copy: the caller's dict cannot change it afterwards
                spec = {k: v for k, v in spec.items() if k != "background"}
                if not isinstance(compaction.get("background", True), bool):  # bool("no") would be True
                    raise bad("compaction", f"'background' must be true or false, got {compaction['background']!r}")
            try:
                policy = resolve(spec)
            except (ValueError, TypeError) as exc:  # InvalidArgument
                raise bad("compaction", f"is not a usable policy: {exc}") from None
            unbounded = [n for n, on in (("relocation_budget", policy.relocation), ("gc_budget", policy.gc))
                         if on and math.isinf(getattr(policy, n))]
            if self.capacity_bytes and unbounded:
                # measured (tests/test_adapter_capacity.py): 'aggressive' took the disk to 1.2-1.35x the
                # bound, its copies outrunning eviction between two checks
                raise bad("compaction", f"with unbounded {' and '.join(unbounded)} (policy {policy.name!r}) may "
                          "write copies without limit between two evictions, so capacity_bytes could not be "
                          "kept; use a policy with finite budgets (e.g. 'full') or capacity_bytes 0")
        if not _is_int(self.workers) or not 1 <= self.workers <= 256:
            raise bad("workers", f"must be an integer in 1..256, got {self.workers!r}")
        ttl = self.lock_ttl_s
        # bounded: an int too large for a float (JSON allows one) raised OverflowError below; inf means "never", as 0
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not (ttl == math.inf or 0 <= ttl <= 1e9):
            raise bad("lock_ttl_s", f"must be a number of seconds within 0..1e9 (0 = locks never expire), got {ttl!r}")
        port = self.metrics_port
        if port is not None and (not _is_int(port) or not 0 <= port <= 65535):
            raise bad("metrics_port", f"must be a TCP port 0..65535 (0: any free one) or null, got {port!r}")
        object.__setattr__(self, "compaction", compaction)
        object.__setattr__(self, "lock_ttl_s", float(ttl))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockstoreL2AdapterConfig:
        """From the `adapter_params` JSON object: unknown keys are refused, values go through the validator."""
        if not isinstance(d, dict):
            raise InvalidArgument(f"blockstore adapter_params must be a JSON object, got {type(d).__name__}")
        params = {k: v for k, v in d.items() if k != "type"}
        unknown = sorted(set(params) - set(cls.FIELDS), key=str)
        if unknown:
            raise InvalidArgument(f"blockstore adapter_params: unknown key(s) {unknown}; known: {list(cls.FIELDS)}")
        return cls(params.pop("path", None), **params)

    @classmethod
    def help(cls) -> str:
        return (
            "blockstore L2 adapter (type 'plugin', module_path 'blockstore.connector.l2_adapter', "
            "class_name 'BlockstoreL2Adapter'); adapter_params:\n"
            "- path (str, required): the store directory (created if missing; one server process per store)\n"
            "- durability ('cache' | 'sync', default 'cache'): 'sync' makes every stored chunk survive a crash "
            "before its store task completes\n"
            "- block_size (int bytes, optional): size of new block files (64 KiB..1 TiB; default: the store's, "
            "64 MiB for a new one)\n"
            "- capacity_bytes (int, default 0 = unbounded): payload bytes the adapter may hold, at least one "
            "block; > 0 enables LMCache's global L2 eviction, and the adapter evicts by value (reads, recency, "
            "size) whole blocks at a time, so that block files stay within capacity_bytes + 8 KiB per record + "
            "the open blocks + one block, with any compaction setting (compaction with an unbounded "
            "relocation_budget or gc_budget, such as 'aggressive', is refused)\n"
            "- admission ('always' | 'second_sighting', default 'always'): with 'second_sighting' a key is "
            "stored only when it is offered a second time (one-off keys never displace reused ones)\n"
            "- compaction (policy name or {\"policy\": name, knob: value}, default 'full'; null, 'none' or 'off' = no compaction): "
            "background GC and affinity relocation (blockstore.compaction policies)\n"
            "- workers (int, default 4): threads for lookups and loads; stores get a pool of the same size\n"
            "- lock_ttl_s (number, default 600; 0 = never): a lookup's lock older than this no longer stops "
            "delete (a backstop for locks whose unlock never comes)\n"
            "- metrics_port (int, optional): serve blockstore's Prometheus metrics (engine, compaction, this "
            "adapter) at http://HOST:PORT/metrics from the server process\n"
            "Put eviction, serde, shared and affinity_tag at the top level of the --l2-adapter JSON, not here."
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


RECORD_FRAMING = 8192  # a record's header, key and page alignment in its block file, at most (beside payload)


def record_bytes(payload: int) -> int:
    """An upper estimate of a record's bytes in its block file: payload page-aligned plus a page of header and
    key (the exact layout is the engine's)."""
    return -(-payload // 4096) * 4096 + 4096


def check_capacity_fits(capacity: int, block_size: int) -> None:
    """Eviction frees space a whole block at a time and every open block is slack on top of the capacity: a
    capacity smaller than one block could not be kept within any stated bound of itself."""
    if capacity < block_size:
        raise InvalidArgument(
            f"blockstore adapter_params: 'capacity_bytes' ({capacity}) must be at least one block "
            f"({block_size} bytes): eviction frees whole blocks, and open blocks are slack on top of the "
            "capacity; set a smaller 'block_size' or a larger capacity")

