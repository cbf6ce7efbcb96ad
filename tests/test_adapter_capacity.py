"""The L2 adapter's capacity promise and eviction by value (issue 16; blockstore/connector/eviction.py):

- block files on disk stay within capacity_bytes + RECORD_FRAMING per record + (open blocks + 1) x block_size
  under every compaction
  setting, none included, when a store is filled far past its capacity (measured on disk, not from counters),
  and afterwards fsck finds nothing and a directory rebuilt from the blocks agrees (no evicted key comes back);
- eviction keeps what is read: a frequently re-read key survives a scan of one-off keys that FIFO would keep;
- admission ('second_sighting') stores a key the second time it is offered;
- settings that cannot keep the promise are refused when the adapter is configured or opened."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from compaction_helpers import block_file_bytes, rebuild_violations  # noqa: E402
from test_connector_adapter import Arena, lookup, okey, store  # noqa: E402

import blockstore  # noqa: E402
from bench.eviction import sim_belady, sim_lru  # noqa: E402
from blockstore.connector.l2_adapter import (  # noqa: E402
    RECORD_FRAMING,
    BlockstoreL2Adapter,
    BlockstoreL2AdapterConfig,
)
from blockstore.errors import InvalidArgument  # noqa: E402
from blockstore.tools import fsck  # noqa: E402

BLOCK = 65536
SMALL = torch.Size([2, 2, 16, 32])  # float32: 8 KiB, ~7 records per 64 KiB block
SMALL_SIZE = 8192


@pytest.fixture
def adapter_block_size() -> int:
    """`make` (conftest.py) gives this module's adapters 64 KiB blocks."""
    return BLOCK


@pytest.mark.parametrize("compaction", [None, "append-only", "semantic-only", "no-gc", "no-relocation", "full"])
def test_disk_stays_within_capacity_plus_slack(make: Callable[..., BlockstoreL2Adapter], arena: Arena,
                                               compaction: str | None) -> None:
    """Ten times the capacity stored in tasks of 8, a third of the recent keys re-read (their locks released
    after the check, as a prefetch releases them after its load), a few deleted by LMCache's eviction (holes
    that no GC fills without compaction): after every task the block files on disk are within
    capacity + RECORD_FRAMING per record + (open blocks + 1) x block_size."""
    capacity = 8 * BLOCK
    a = make(capacity_bytes=capacity, compaction=compaction)
    src = arena.new(SMALL, fill=1)
    worst = 0.0
    n_keys = 10 * capacity // SMALL_SIZE
    for t in range(0, n_keys, 8):
        keys = [okey(t + i) for i in range(8)]
        store(a, keys, [src] * 8)
        reread = [okey(j) for j in range(max(0, t - 96), t, 3)]
        lookup(a, reread)
        if t % 32 == 0:
            a.delete([okey(j) for j in range(max(0, t - 40), t, 5)])
        st = a.store.stats()
        on_disk = block_file_bytes(a.config.path)
        bound = capacity + st.records * RECORD_FRAMING + (st.open_blocks + 1) * BLOCK
        worst = max(worst, on_disk / bound)
        assert on_disk <= bound, (t, on_disk, bound, st.as_dict(), a.report_status()["counters"])
        a.submit_unlock(reread)
        assert a.get_usage().total_bytes_used <= capacity
    c = a.report_status()["counters"]
    assert c["evicted_for_capacity"] > n_keys // 2  # the budget was really exercised
    assert worst > 0.5  # and the disk was really filled up to near the bound
    assert c["blocks_evicted"] > 0, c  # whole blocks went through Store.evict_blocks (no tombstones)
    # nothing evicted can come back: fsck finds nothing unreferenced, a directory rebuilt from the blocks agrees
    a.close()
    findings = [f.line() for f in fsck.check(a.config.path, log=False).findings]
    assert not findings, findings
    with blockstore.open(a.config.path, create=False) as s:
        assert rebuild_violations(s) == []


def test_eviction_writes_no_tombstones_and_leaves_no_tombstone_only_blocks(make: Callable[..., BlockstoreL2Adapter],
                                                                           arena: Arena) -> None:
    """Evictions wrote a tombstone per key into the blocks being filled; without compaction such a block, once
    its records were gone, held only tombstones and was never reclaimed (9.7x the capacity on disk). Now an
    emptied block goes with its keys in one engine call (Store.evict_blocks), without a tombstone."""
    capacity = 4 * BLOCK
    a = make(capacity_bytes=capacity)
    src = arena.new(SMALL, fill=2)
    for t in range(0, 30 * capacity // SMALL_SIZE, 4):
        store(a, [okey(t + i) for i in range(4)], [src] * 4)
    c = a.report_status()["counters"]
    assert c["blocks_evicted"] >= 20 and c["evicted_for_capacity"] > 0
    table = a.store.block_table()
    assert sum(e.tombstones for e in table) == 0, [e for e in table if e.tombstones]
    st = a.store.stats()
    assert block_file_bytes(a.config.path) <= capacity + st.records * RECORD_FRAMING + (st.open_blocks + 1) * BLOCK


def test_a_reread_key_survives_a_scan_that_fifo_would_keep(make: Callable[..., BlockstoreL2Adapter],
                                                          arena: Arena) -> None:
    """The value order: a key read between the stores of a long scan of one-off keys stays; FIFO (the old
    eviction) would have evicted it first, being the oldest, and kept the newer one-off keys."""
    capacity = 4 * BLOCK
    a = make(capacity_bytes=capacity)
    src = arena.new(SMALL, fill=3)
    hot = okey(10_000)
    store(a, [hot], [src])
    oneoff = 0
    for _ in range(60):  # ~15x the capacity of one-off keys
        store(a, [okey(oneoff + i) for i in range(4)], [src] * 4)
        oneoff += 4
        assert lookup(a, [hot]) == [True]
        a.submit_unlock([hot])
    first_scanned = okey(0)
    assert lookup(a, [first_scanned]) == [False]  # a one-off key older than the last reads of hot: gone
    c = a.report_status()["counters"]
    assert c["kept_by_value"] > 0 and c["evicted_for_capacity"] > 0


def test_unread_keys_go_before_read_ones_in_open_blocks(make: Callable[..., BlockstoreL2Adapter],
                                                        arena: Arena) -> None:
    """Within one (open) block too the order is by value, not by age: of four keys, the two read ones stay."""
    a = make(capacity_bytes=4 * 32768, block_size=4 * 32768)
    objs = [arena.new(fill=i) for i in range(6)]
    k = [okey(i) for i in range(6)]
    store(a, k[:4], objs[:4])
    assert lookup(a, [k[0], k[1]]) == [True, True]
    a.submit_unlock([k[0], k[1]])
    store(a, k[4:6], objs[4:6])
    assert lookup(a, k) == [True, True, False, False, True, True]


def test_admission_on_second_sighting(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make(admission="second_sighting")
    src = arena.new(SMALL, fill=4)
    k = [okey(i) for i in range(3)]
    res = store(a, k, [src] * 3)
    assert res.is_successful() and res.bytes_transferred() == 0  # first sighting: not stored
    assert lookup(a, k) == [False] * 3
    assert store(a, k[:2], [src] * 2).bytes_transferred() == 2 * SMALL_SIZE  # second: stored
    assert lookup(a, k) == [True, True, False]
    a.submit_unlock(k[:2])
    assert a.report_status()["counters"]["skipped_admission"] == 3


def test_config_refuses_what_cannot_keep_the_promise(make: Callable[..., BlockstoreL2Adapter],
                                                     tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="'capacity_bytes'.*at least one block"):
        BlockstoreL2AdapterConfig(str(tmp_path / "x"), capacity_bytes=BLOCK - 1, block_size=BLOCK)
    with pytest.raises(InvalidArgument, match="'admission'"):
        BlockstoreL2AdapterConfig(str(tmp_path / "x"), admission="never")
    # no block_size given: the store's own (64 MiB for a new one) is checked when the adapter opens it
    with pytest.raises(InvalidArgument, match="at least one block"):
        make(path=str(tmp_path / "y"), block_size=None, capacity_bytes=1 << 20)
    make(path=str(tmp_path / "y"), block_size=None, capacity_bytes=64 << 20).close()  # closed: not locked
    # compaction whose copies have no budget can outrun eviction (measured: 1.2-1.35x the bound)
    with pytest.raises(InvalidArgument, match="'compaction'.*unbounded relocation_budget and gc_budget"):
        BlockstoreL2AdapterConfig(str(tmp_path / "x"), capacity_bytes=BLOCK, block_size=BLOCK, compaction="aggressive")
    with pytest.raises(InvalidArgument, match="unbounded gc_budget"):
        BlockstoreL2AdapterConfig(str(tmp_path / "x"), capacity_bytes=BLOCK, block_size=BLOCK,
                                  compaction={"policy": "full", "gc_budget": float("inf")})
    assert BlockstoreL2AdapterConfig(str(tmp_path / "x"), compaction="aggressive").compaction == "aggressive"


def test_bench_belady_is_the_optimum_the_online_policies_stay_under() -> None:
    """bench/eviction.py's floor is right: on small random traces its Belady (MIN with bypass) equals an
    exhaustive search over every eviction and bypass choice, and LRU and FIFO never beat it."""

    def best(trace: list[list[int]], cap: int) -> int:
        @functools.cache
        def go(ri: int, held: frozenset[int]) -> int:
            if ri == len(trace):
                return 0
            req = trace[ri]
            hits = sum(1 for k in req if k in held)
            options = {held}
            for k in [k for k in req if k not in held]:  # each miss may be stored, evicting any held key
                grown = set()
                for h in options:
                    grown.add(h)
                    if len(h) < cap:
                        grown.add(h | {k})
                    else:
                        grown.update((h - {v}) | {k} for v in h)
                options = grown
            return hits + max(go(ri + 1, h) for h in options)

        return go(0, frozenset())

    rng = random.Random(7)
    for _ in range(25):
        trace = [[rng.randrange(6) for _ in range(rng.randint(1, 2))] for _ in range(8)]
        trace = [list(dict.fromkeys(r)) for r in trace]
        total = sum(len(r) for r in trace)
        for cap in (1, 2, 3):
            opt = best(trace, cap) / total
            assert sim_belady(trace, cap) == pytest.approx(opt)
            assert sim_lru(trace, cap) <= opt + 1e-12 and sim_lru(trace, cap, fifo=True) <= opt + 1e-12
