"""Prometheus metrics: what the engine, compaction and the LMCache adapter expose, through prometheus-client.

Two kinds of metric, so that a store costs nothing for them while nobody collects:

- **Read at scrape time** from the objects themselves (custom collectors): a store's `stats()` (records,
  bytes, blocks, space and write amplification), `io_counters()`, its block table (the φ histogram: the
  invalid ratio of sealed blocks), its last `recovery_report`, its compactor's `status()`, and an L2
  adapter's `report_status()` counters. The engine keeps these numbers anyway; `track(store)` and
  `track_adapter(adapter)` only hold a weak reference.
- **Counted on the hot path** (keys, bytes read, hits, latency histograms whose `_count` is the number
  of calls, errors; seals, compaction passes and pacing), only while metrics are enabled (`enable()`,
  which `serve()` calls). Store's put_many/get_many/delete_many are made countable by `instrument`
  (track() does it): disabled, the class holds its plain methods (nothing to pay); enable() switches in
  counting versions. The other engine calls (`sealed_done`, `compaction_pass_done`, `compaction_paced`)
  are made only `if metrics.enabled`.

Everything is registered in this module's own `REGISTRY` (not prometheus-client's global one, which a
host process such as vLLM or LMCache fills with its own metrics). `serve(port)` exposes it over HTTP;
`blockstore metrics PATH` (tools/metrics_cmd.py) prints one store's scrape-time metrics once.

Every metric name starts with `blockstore_`. prometheus-client is a core dependency: it is pure Python with
no dependencies of its own, and `blockstore metrics` must work in any installation.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from blockstore import logs
from blockstore.directory import BLOCK_SEALED, BlockEntry
from blockstore.errors import InvalidArgument, error_for_os
from blockstore.stats import StoreStats

_log = logs.get("metrics")

enabled = False  # the hot-path switch (enable(), serve()); the engine tests it before counting anything

REGISTRY = CollectorRegistry(auto_describe=True)

# 50 µs (a warm small get) to 10 s (a put stuck behind a full disk's retries)
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PASS_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0)
PHI_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
OPS = ("put", "get", "delete")

_op_keys = Counter("blockstore_operation_keys", "Keys named by store API calls", ["op"], registry=REGISTRY)
_op_seconds = Histogram("blockstore_operation_seconds", "Latency of store API calls (_count: the calls; a "
                        "batched call is one)", ["op"],
                        buckets=LATENCY_BUCKETS, registry=REGISTRY)
_op_errors = Counter("blockstore_operation_errors", "Store API calls that raised", ["op"], registry=REGISTRY)
_read_hits = Counter("blockstore_read_hits", "Keys reads found (misses: operation_keys{op=\"get\"} - this)",
                     registry=REGISTRY)
_read_bytes = Counter("blockstore_read_bytes", "Payload bytes returned by reads", registry=REGISTRY)
_sealed = Counter("blockstore_blocks_sealed", "Blocks sealed (rotated out, idle, or at close)", registry=REGISTRY)
_sealed_bytes = Counter("blockstore_sealed_block_bytes", "Data bytes of the blocks sealed", registry=REGISTRY)
_pass_seconds = Histogram("blockstore_compaction_pass_seconds", "Duration of compaction passes",
                          buckets=PASS_BUCKETS, registry=REGISTRY)
_pass_moved = Counter("blockstore_compaction_pass_moved_bytes", "Bytes compaction passes copied, by kind",
                      ["kind"], registry=REGISTRY)
_paced = Counter("blockstore_compaction_paced_seconds",
                 "Time compaction's copies slept to stay under their copy rate", registry=REGISTRY)
_copy_rate = Gauge("blockstore_compaction_copy_rate_bytes",
                   "Compaction's copy rate as the foreground-latency guard last set it (bytes/s)", registry=REGISTRY)
_slowed = Counter("blockstore_compaction_slowed",
                  "Times the foreground-latency guard halved compaction's copy rate (foreground p99 over target)",
                  registry=REGISTRY)

# bound once: a labelled child looked up per call would cost a dict lookup and a lock
_by_op = {op: (_op_keys.labels(op), _op_seconds.labels(op)) for op in OPS}
_failed = {op: _op_errors.labels(op) for op in OPS}
_moved_gc, _moved_relocation = _pass_moved.labels("gc"), _pass_moved.labels("relocation")


def enable() -> None:
    """Start counting on the hot path (serve() calls it): the instrumented methods are switched in."""
    global enabled
    enabled = True
    for owner, name, _plain, counted in _switched:
        setattr(owner, name, counted)


def disable() -> None:
    """Stop counting on the hot path (scrape-time metrics stay): the plain methods are switched back."""
    global enabled
    enabled = False
    for owner, name, plain, _counted in _switched:
        setattr(owner, name, plain)


# ------------------------------------------------------------------------------ hot path (engine calls)

# The Store methods counted on the hot path: name -> operation. Each takes its items or keys first.
TIMED_METHODS = {"put_many": "put", "get_many": "get", "delete_many": "delete"}
_switched: list[tuple[type, str, Any, Any]] = []  # (class, method name, plain method, counting method)


def instrument(cls: type, methods: dict[str, str] | None = None) -> None:
    """Make `methods` (TIMED_METHODS: Store's put_many, get_many, delete_many) of `cls` countable, once
    per class that defines them; track() does it for the class of each store it is given. While metrics
    are disabled the class keeps its plain methods (a call costs exactly what it did); enable() switches
    in versions that count and time each call (a get's hits and bytes too) and its exceptions."""
    for name, op in (methods or TIMED_METHODS).items():
        owner = next(c for c in cls.__mro__ if name in vars(c))
        if is_instrumented(owner, name):
            continue
        plain = vars(owner)[name]
        counted = _counting(op, plain)
        _switched.append((owner, name, plain, counted))
        if enabled:
            setattr(owner, name, counted)


def is_instrumented(owner: type, name: str) -> bool:
    """Whether instrument() made `owner.name` (defined in `owner` itself) countable."""
    return any(o is owner and n == name for o, n, _p, _c in _switched)


def plain_method(owner: type, name: str) -> Callable[..., Any]:
    """`owner.name` without its metrics (for benchmarks: the baseline)."""
    return next((p for o, n, p, _c in _switched if o is owner and n == name), getattr(owner, name))


def _counting(op: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            result = method(self, *args, **kwargs)
        except BaseException:
            _failed[op].inc()
            raise
        if op == "get":
            read_done(result, started)
        else:
            items = args[0] if args else kwargs.get("items", kwargs.get("keys", ()))
            done(op, len(items) if hasattr(items, "__len__") else 0, started)
        return result

    return counted


def done(op: str, keys: int, started: float) -> None:
    """A store call `op` for `keys` keys returned; `started` is its perf_counter()."""
    nkeys, seconds = _by_op[op]
    nkeys.inc(keys)
    seconds.observe(time.perf_counter() - started)


def read_done(results: Sequence[Any], started: float) -> None:
    """A batched read returned `results` (get_many's: a buffer or a length per key, None for a miss)."""
    done("get", len(results), started)
    hits = nbytes = 0
    for r in results:
        if r is not None:
            hits += 1
            nbytes += r if isinstance(r, int) else len(r)
    _read_hits.inc(hits)
    _read_bytes.inc(nbytes)


def sealed_done(data_bytes: int) -> None:
    """A block was sealed holding `data_bytes` bytes of records."""
    _sealed.inc()
    _sealed_bytes.inc(data_bytes)


def compaction_pass_done(seconds: float, gc_bytes: int, relocated_bytes: int) -> None:
    """A compaction pass (not a dry run) finished after `seconds`, having copied these bytes."""
    _pass_seconds.observe(seconds)
    _moved_gc.inc(gc_bytes)
    _moved_relocation.inc(relocated_bytes)


def compaction_paced(seconds: float) -> None:
    """Compaction slept `seconds` to keep its copy rate (and so the foreground's latency) in bounds."""
    _paced.inc(seconds)


def compaction_guard(rate_bytes_s: float, slowed: bool) -> None:
    """The foreground-latency guard judged the reads since its last look: the copy rate is now
    `rate_bytes_s`; `slowed`: it was halved because the foreground's p99 was over its target."""
    _copy_rate.set(rate_bytes_s)
    if slowed:
        _slowed.inc()


# ------------------------------------------------------------------------------ scrape time

class MeasuredStore(Protocol):
    """What the store collector reads: a blockstore.Store's public API."""

    @property
    def path(self) -> str: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def durability(self) -> str: ...
    @property
    def recovery_report(self) -> dict[str, Any] | None: ...
    @property
    def compactor(self) -> Any: ...

    def stats(self) -> StoreStats: ...
    def block_table(self) -> list[BlockEntry]: ...


_STATS_GAUGES = {  # StoreStats field: help
    "records": "Live records",
    "live_bytes": "Bytes of live records on disk (headers included)",
    "live_logical_bytes": "Keys and payloads of live records",
    "written_bytes": "Bytes of records in block files, live or dead",
    "blocks": "Block files",
    "open_blocks": "Blocks open for appends",
    "block_file_bytes": "Size of the block files on disk",
    "directory_bytes": "Size of the RocksDB directory on disk",
    "space_amplification": "(block files + directory) / live logical bytes",
    "write_amplification": "Bytes appended / bytes users put (compaction's copies included)",
}
_RECOVERY_GAUGES = ("scanned_blocks", "truncated_bytes", "dropped_entries", "missing_blocks", "forgotten_blocks")
_COMPACTION_COUNTERS = {  # compactor.status() key: (metric, help)
    "passes": ("blockstore_compaction_passes", "Compaction passes run by this process"),
    "gc_bytes_total": ("blockstore_compaction_gc_bytes", "Live bytes GC copied out of victim blocks (store lifetime)"),
    "relocated_bytes_total": ("blockstore_compaction_relocated_bytes", "Bytes relocation copied (store lifetime)"),
    "blocks_reclaimed_total": ("blockstore_compaction_blocks_reclaimed", "Blocks compaction emptied and deleted"),
    "groups_relocated_total": ("blockstore_compaction_groups_relocated", "Affinity groups relocated"),
    "requests_observed": ("blockstore_compaction_requests_observed", "Read requests affinity learning saw"),
}
_COMPACTION_GAUGES = {
    "running": "1 while the background compactor thread runs",
    "groups_tracked": "Affinity groups tracked",
    "keys_tracked": "Keys in tracked affinity groups",
}


class StoreCollector(Collector):
    """Scrape-time metrics of the stores `stores()` returns, labelled by path. A closed store is skipped."""

    def __init__(self, stores: Callable[[], Iterable[MeasuredStore]]) -> None:
        self._stores = stores

    def collect(self) -> Iterator[Metric]:
        fams = _Families()
        for s in list(self._stores()):
            try:
                st = s.stats()
                table = s.block_table()
            except Exception:  # closed meanwhile, or an I/O error: a scrape never fails for one store
                continue
            self._store(fams, s, st, table)
        yield from fams.all()

    @staticmethod
    def _store(fams: _Families, s: MeasuredStore, st: StoreStats, table: list[BlockEntry]) -> None:
        label = [s.path]
        for name, text in _STATS_GAUGES.items():
            fams.gauge(f"blockstore_{name}", text, ["store"]).add_metric(label, float(getattr(st, name)))
        fams.counter("blockstore_put_bytes", "Keys and payloads users put (store lifetime)",
                     ["store"]).add_metric(label, st.bytes_put)
        fams.counter("blockstore_appended_bytes", "Bytes appended to block files (store lifetime)",
                     ["store"]).add_metric(label, st.bytes_appended)
        fams.gauge("blockstore_read_only", "1 if this process opened the store read-only",
                   ["store"]).add_metric(label, float(s.read_only))
        _phi_histogram(fams, label, table)
        rep = s.recovery_report
        fams.gauge("blockstore_recovered", "1 if the last open ran recovery after an unclean stop",
                   ["store"]).add_metric(label, float(rep is not None))
        for key in _RECOVERY_GAUGES:
            value = 0 if rep is None else rep[key]
            fams.gauge(f"blockstore_recovery_{key}", f"Recovery at the last open: {key.replace('_', ' ')}",
                       ["store"]).add_metric(label, float(len(value) if isinstance(value, list) else value))
        if s.compactor is not None:
            _compaction(fams, label, s.compactor)


def _phi_histogram(fams: _Families, label: list[str], table: list[BlockEntry]) -> None:
    """The invalid ratio φ (dead / written bytes) of the sealed blocks: what GC chooses its victims by."""
    counts = [0] * len(PHI_BUCKETS)
    total = 0.0
    sealed = [e for e in table if e.state == BLOCK_SEALED]
    for e in sealed:
        phi = e.invalid_ratio
        total += phi
        for i, bound in enumerate(PHI_BUCKETS):
            if phi <= bound:
                counts[i] += 1
                break
    cumulative, buckets = 0, []
    for bound, n in zip(PHI_BUCKETS, counts):
        cumulative += n
        buckets.append((str(bound), cumulative))
    buckets.append(("+Inf", len(sealed)))
    fams.histogram("blockstore_block_invalid_ratio", "Invalid ratio φ of sealed blocks",
                   ["store"]).add_metric(label, buckets, total)


def _compaction(fams: _Families, label: list[str], compactor: Any) -> None:
    status = compactor.status()
    for key, (name, text) in _COMPACTION_COUNTERS.items():
        fams.counter(name, text, ["store"]).add_metric(label, status.get(key) or 0)
    for key, text in _COMPACTION_GAUGES.items():
        fams.gauge(f"blockstore_compaction_{key}", text, ["store"]).add_metric(label, float(status.get(key) or 0))
    fams.gauge("blockstore_compaction_failing", "1 if the last compaction pass failed",
               ["store"]).add_metric(label, float(bool(status.get("failing"))))
    threshold = getattr(getattr(compactor, "policy", None), "gc_invalid_ratio", None)
    if isinstance(threshold, (int, float)):
        fams.gauge("blockstore_compaction_gc_invalid_ratio", "The φ at which GC collects a block",
                   ["store"]).add_metric(label, float(threshold))


# The adapter's counters (BlockstoreL2Adapter.report_status()["counters"]) as labelled metrics; a counter
# not named here is exported as blockstore_adapter_<name>_total, so a new one is never dropped silently.
ADAPTER_COUNTERS: dict[str, tuple[str, dict[str, str]]] = {
    "store_tasks": ("tasks", {"kind": "store"}),
    "lookup_tasks": ("tasks", {"kind": "lookup"}),
    "load_tasks": ("tasks", {"kind": "load"}),
    "keys_stored": ("keys", {"kind": "store"}),
    "lookup_keys": ("keys", {"kind": "lookup"}),
    "load_keys": ("keys", {"kind": "load"}),
    "keys_deleted": ("keys", {"kind": "delete"}),
    "lookup_hits": ("hits", {"tier": "l2", "stage": "lookup"}),
    "load_hits": ("hits", {"tier": "l2", "stage": "load"}),
    "load_miss_absent": ("load_misses", {"reason": "absent"}),
    "load_miss_layout": ("load_misses", {"reason": "layout"}),
    "load_miss_corrupt": ("load_misses", {"reason": "corrupt"}),
    "load_miss_error": ("load_misses", {"reason": "error"}),
    "bytes_stored": ("bytes", {"direction": "stored"}),
    "load_bytes": ("bytes", {"direction": "loaded"}),
    "evicted_for_capacity": ("evictions", {}),
    "skipped_capacity": ("store_skipped", {"reason": "capacity"}),
    "skipped_locked": ("store_skipped", {"reason": "locked"}),
    "duplicates_skipped": ("store_skipped", {"reason": "duplicate"}),
}
_ADAPTER_HELP = {
    "tasks": "L2 tasks, by kind",
    "keys": "Keys stored, looked up, loaded and deleted",
    "hits": "Keys the L2 tier (blockstore) had, at lookup and at load",
    "load_misses": "Keys a load did not fill, by why",
    "bytes": "Payload bytes stored and loaded",
    "evictions": "Keys the adapter evicted to stay within capacity_bytes",
    "store_skipped": "Keys a store task did not write, by why",
}
_ADAPTER_GAUGES = {
    "records": "Records the adapter holds", "used_bytes": "Bytes the adapter's records take",
    "capacity_bytes": "capacity_bytes (0: unbounded)", "locked_keys": "Keys locked by lookups (held)",
    "consecutive_task_failures": "Task failures in a row", "recovered_keys": "Keys announced at start",
}


class AdapterCollector(Collector):
    """Scrape-time metrics of L2 adapters, from their `report_status()` (labelled by store path)."""

    def __init__(self, adapters: Callable[[], Iterable[Any]]) -> None:
        self._adapters = adapters

    def collect(self) -> Iterator[Metric]:
        fams = _Families()
        for a in list(self._adapters()):
            status = a.report_status()  # never raises (LMCache's contract for /status)
            label = {"store": str(status.get("path", ""))}
            fams.gauge("blockstore_adapter_healthy", "1 if the adapter reports itself healthy",
                       list(label)).add_metric(list(label.values()), float(bool(status.get("is_healthy"))))
            for key, text in _ADAPTER_GAUGES.items():
                if isinstance(status.get(key), (int, float)):
                    fams.gauge(f"blockstore_adapter_{key}", text, list(label)).add_metric(
                        list(label.values()), float(status[key]))
            for kind, n in (status.get("inflight_tasks") or {}).items():
                fams.gauge("blockstore_adapter_inflight_tasks", "Tasks queued or running, by kind",
                           ["store", "kind"]).add_metric([label["store"], str(kind)], float(n))
            for key, value in (status.get("counters") or {}).items():
                name, extra = ADAPTER_COUNTERS.get(key, (key, {}))
                labels = {**label, **extra}
                text = _ADAPTER_HELP.get(name, f"The adapter's counter {key}")
                fams.counter(f"blockstore_adapter_{name}", text, list(labels)).add_metric(
                    list(labels.values()), value)
        yield from fams.all()


class _Families:
    """Metric families of one scrape by name, created on first use (each store or adapter adds samples)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Any] = {}

    def _get(self, cls: type, name: str, text: str, labels: list[str]) -> Any:
        fam = self._by_name.get(name)
        if fam is None:
            fam = self._by_name[name] = cls(name, text, labels=labels)
        return fam

    def gauge(self, name: str, text: str, labels: list[str]) -> GaugeMetricFamily:
        return self._get(GaugeMetricFamily, name, text, labels)  # type: ignore[no-any-return]

    def counter(self, name: str, text: str, labels: list[str]) -> CounterMetricFamily:
        return self._get(CounterMetricFamily, name, text, labels)  # type: ignore[no-any-return]

    def histogram(self, name: str, text: str, labels: list[str]) -> HistogramMetricFamily:
        return self._get(HistogramMetricFamily, name, text, labels)  # type: ignore[no-any-return]

    def all(self) -> Iterator[Metric]:
        yield from self._by_name.values()


# ------------------------------------------------------------------------------ what is tracked, serving

_stores: weakref.WeakSet[Any] = weakref.WeakSet()
_adapters: weakref.WeakSet[Any] = weakref.WeakSet()
REGISTRY.register(StoreCollector(lambda: list(_stores)))
REGISTRY.register(AdapterCollector(lambda: list(_adapters)))


def track(store: MeasuredStore) -> None:
    """Expose this store's scrape-time metrics while it lives (a weak reference: it never keeps a store
    open or alive), and make its class's operations countable (instrument). A Store calls it when it
    opens (opening.announce_open)."""
    instrument(type(store))
    _stores.add(store)


def untrack(store: MeasuredStore) -> None:
    _stores.discard(store)


def track_adapter(adapter: Any) -> None:
    """Expose an L2 adapter's counters (anything with LMCache's `report_status()`) while it lives."""
    _adapters.add(adapter)


@dataclass
class Endpoint:
    """A running metrics HTTP endpoint (`/metrics`, and every other path, answers the exposition)."""

    port: int
    server: Any
    thread: Any

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(port: int, addr: str = "0.0.0.0") -> Endpoint:
    """Serve REGISTRY on `port` (0: a free one; Endpoint.port says which) from a daemon thread, and start
    counting on the hot path. `addr` as prometheus-client's (all interfaces by default)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgument(f"metrics port must be an int within 0..65535, got {port!r}")
    try:
        server, thread = start_http_server(port, addr=addr, registry=REGISTRY)
    except OSError as exc:  # the port is taken, the address is not ours
        raise error_for_os(exc, f"serve metrics on {addr}:{port}") from exc
    enable()
    bound = int(server.server_port)
    _log.info("serving Prometheus metrics on http://%s:%d/metrics", addr, bound)
    return Endpoint(bound, server, thread)
