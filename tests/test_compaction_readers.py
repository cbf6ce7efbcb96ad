"""Readers while the background compactor collects and relocates under a writer.

Several reader threads hammer get/get_many (which also teaches the compactor co-access groups, so
relocation runs too) while a writer overwrites and deletes keys and the store's background compactor
runs passes every few milliseconds with aggressive thresholds. Every value embeds its key and version,
so a reader can check that whatever bytes it gets are a value that was written for that key. Readers
must never raise; at the end the store equals the writer's model, and so does a reopened store.
"""

from __future__ import annotations

import random
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from compaction_helpers import AGGRESSIVE, MIB, parse_value, rebuild_violations, value

import blockstore
from blockstore import hooks
from blockstore.keys import SPACE_CHUNK, SPACE_KV, encode_chunk_key, key_suffix

KEYS = [b"key-%02d" % i for i in range(40)]
STABLE = set(KEYS[:8])  # overwritten, never deleted
SIZES = [700, 4096, 20_000, 90_000, 150_000]


class Workload:
    def __init__(self, store: blockstore.Store, seed: int) -> None:
        self.s = store
        self.rnd = random.Random(seed)
        self.model: dict[bytes, bytes | None] = {}
        self.written: dict[bytes, set[int]] = {k: set() for k in KEYS}  # versions ever written (or being)
        self.version = 0
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.reads = 0
        self.stable_misses = 0
        self.ops = 0

    def _new(self, k: bytes) -> bytes:
        self.version += 1
        self.written[k].add(self.version)  # before the put: a reader may see it as soon as it is issued
        v = value(k, self.version, self.rnd.choice(SIZES))
        return v

    def populate(self) -> None:
        for i in range(0, len(KEYS), 5):
            items = [(k, self._new(k)) for k in KEYS[i : i + 5]]
            self.s.put_many(items, partition=f"p{i % 3}")
            self.model.update(items)

    def writer(self) -> None:
        rnd = self.rnd
        try:
            while not self.stop.is_set():
                r = rnd.random()
                if r < 0.55:
                    k = rnd.choice(KEYS)
                    v = self._new(k)
                    self.s.put(k, v, partition=rnd.choice([None, "p0", "p1", "p2"]))
                    self.model[k] = v
                elif r < 0.8:
                    ks = rnd.sample(KEYS, rnd.randint(2, 4))
                    items = [(k, self._new(k)) for k in ks]
                    self.s.put_many(items, partition=rnd.choice(["p0", "p1", "p2", "batch"]))
                    self.model.update(items)
                else:
                    k = rnd.choice([k for k in KEYS if k not in STABLE])
                    assert self.s.delete(k) == (self.model.get(k) is not None)
                    self.model[k] = None
                self.ops += 1
                time.sleep(0.0005 if self.ops % 4 else 0.002)  # leave the compactor and readers room
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.errors.append(f"writer: {exc!r}")
            self.stop.set()

    def _check(self, k: bytes, got: Any, who: str) -> None:
        if got is None:
            if k in STABLE:
                self.stable_misses += 1
            return
        try:
            key, ver = parse_value(got)
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"{who}: {k!r} returned bytes that were never written: {exc!r}")
            return
        if key != k or ver not in self.written[k]:
            self.errors.append(f"{who}: {k!r} returned the value of {key!r} version {ver}")

    def reader(self, seed: int) -> None:
        rnd = random.Random(seed)
        who = f"reader-{seed}"
        # a few fixed "conversations" that are read together again and again (relocation's food)
        groups = [rnd.sample(KEYS, rnd.randint(2, 6)) for _ in range(4)]
        try:
            while not self.stop.is_set():
                r = rnd.random()
                if r < 0.6:
                    ks = rnd.choice(groups)
                elif r < 0.7:
                    ks = rnd.sample(KEYS, rnd.randint(2, 8))
                else:
                    ks = [rnd.choice(KEYS)]
                if rnd.random() < 0.3:
                    out = [bytearray(160_000) for _ in ks]
                    lens = self.s.get_many(ks, out=out)
                    got = [None if n is None else bytes(o[:n]) for o, n in zip(out, lens)]
                elif len(ks) == 1:
                    got = [self.s.get(ks[0])]
                else:
                    got = [None if v is None else bytes(v) for v in self.s.get_many(ks)]
                for k, g in zip(ks, got):
                    self._check(k, g, who)
                self.reads += 1
                time.sleep(0.0002)  # let the writer and the compactor have the GIL too
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.errors.append(f"{who}: {exc!r}")
            self.stop.set()


@pytest.mark.parametrize("seed", [1, 2])
def test_readers_never_see_errors_or_foreign_bytes_while_gc_and_relocation_run(tmp_path: Path, backend: str,
                                                                                seed: int) -> None:
    spec = {**AGGRESSIVE, "min_hits": 3, "interval_s": 0.002, "rate_mb_s": 10_000.0}
    s = blockstore.open(tmp_path, block_size=MIB, max_open_blocks=4, backend=backend, compaction=spec)
    c = s.compactor
    w = Workload(s, seed)
    try:
        w.populate()
        threads = [threading.Thread(target=w.writer, name="writer")]
        threads += [threading.Thread(target=w.reader, args=(seed * 10 + i,), name=f"reader-{i}") for i in range(3)]
        for t in threads:
            t.start()
        # at least 1.5 s and 100 writes and reads under compaction: on a loaded machine (or where
        # overwrites and deletes sync, as in cache mode since issue 13) 1.5 s alone gave ~70 writes
        time.sleep(1.5)
        deadline = time.monotonic() + 20
        # and at least two compaction passes among them: the background thread may run at idle priority
        # (pacing.py), so on a loaded machine its passes come later
        while ((w.ops <= 100 or w.reads <= 100 or c.status()["passes"] < 2) and time.monotonic() < deadline
               and not w.stop.is_set()):
            time.sleep(0.1)
        w.stop.set()
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        assert w.errors == [], w.errors[:5]
        assert w.ops > 100 and w.reads > 100
        status = c.status()
        assert status["passes"] >= 2
        assert status["gc_bytes_total"] > 0 and status["blocks_reclaimed_total"] > 0, status
        assert status["groups_tracked"] > 0
        assert status["last_error"] is None  # no pass failed (a source emptied mid-pass is a lost race)
        got = [None if v is None else bytes(v) for v in s.get_many(KEYS)]
        assert got == [w.model.get(k) for k in KEYS]
        assert s.stats().records == sum(v is not None for v in w.model.values())
    finally:
        s.close()
    assert not c.status()["running"]
    with blockstore.open(tmp_path, block_size=MIB, backend=backend) as s:
        assert s.recovery_report is None
        assert [s.get(k) for k in KEYS] == [w.model.get(k) for k in KEYS]
        assert sorted(s.iter_keys()) == sorted(k for k, v in w.model.items() if v is not None)
        assert rebuild_violations(s) == []
    # A read retries its lookup when its records' block vanished under it; a miss on a never-deleted
    # key would need compaction to move the record at every retry. Counted and reported, not asserted,
    # so a pathological schedule on a loaded machine cannot make this stress test flaky (the
    # deterministic version is the next test).
    if w.stable_misses:
        warnings.warn(f"{w.stable_misses} reads of never-deleted keys returned a miss", stacklevel=1)


def test_a_record_moved_twice_under_a_reader_is_still_found(tmp_path: Path) -> None:
    with blockstore.open(tmp_path, block_size=MIB, max_open_blocks=1) as s:
        s.put(b"k", b"v" * (600 << 10))
        s.put(b"other", b"o" * (600 << 10), partition="elsewhere")  # does not fit: k's block is sealed now
        nid = s.namespace_id("default")
        assert nid is not None
        sfx = key_suffix(nid, SPACE_KV, b"k")
        moves = [b"\0compaction/gc", b"\0compaction/relocate"]

        def compact_under_the_reader(*_a: object) -> None:
            # what GC (or relocation) does to k between the reader's lookup and its read; a block holds
            # one such record, so each move seals the block the previous one went to, and it is
            # emptied and deleted
            if not moves:
                return
            loc = s.dir.get_locations([sfx])[0]
            assert loc is not None
            payload = s.read_locations([loc])[0]
            assert s.relocate_many([(sfx, loc, payload)], partition=moves.pop(0)) == [True]
            assert s.sync_moves() == [loc.block_id]
            assert loc.block_id not in {e.block_id for e in s.block_table()}

        with hooks.installed("read.located", compact_under_the_reader):
            got = s.get(b"k")
        assert not moves
        assert got == b"v" * (600 << 10), "a live key read as a miss"


def test_a_chunk_rewritten_and_its_block_reclaimed_under_get_chunks_keeps_its_own_meta(tmp_path: Path) -> None:
    """get_chunks looked a chunk up, then (before its read) the chunk was rewritten with new text and meta
    and GC deleted the old block: the read looks the key up again and gets the new text. Before, that text
    was decoded with the first lookup's meta: the new text under the old meta (H73 left it)."""
    from blockstore import ChunkWrite
    from blockstore.compaction import attach

    with blockstore.open(tmp_path, block_size=MIB, max_open_blocks=1) as s:
        s.put_chunks([ChunkWrite("u", "s", "c", "old " * (150 << 10), meta={"version": 1})])
        rewritten: list[int] = []

        def rewrite_under_the_reader(*_a: object) -> None:
            if rewritten:
                return
            old = s.dir.get_locations([key_suffix(s.namespace_id("default") or 0, SPACE_CHUNK,
                                                  encode_chunk_key(b"u", b"s", b"c"))])[0]
            assert old is not None
            s.put_chunks([ChunkWrite("u", "s", "c", "new " * (150 << 10), meta={"version": 2})])  # seals the old block
            attach(s, {**AGGRESSIVE, "relocation": False}, background=False).run_until_idle()
            assert old.block_id not in {e.block_id for e in s.block_table()}  # the old record's block is gone
            rewritten.append(old.block_id)

        with hooks.installed("read.located", rewrite_under_the_reader):
            got = s.get_chunks([("u", "s", "c")])[0]
        assert rewritten and got is not None
        assert got.text.startswith("new ") and got.meta == {"version": 2}


def test_a_chunk_asked_twice_and_rewritten_under_get_chunks_keeps_its_own_meta_both_times(tmp_path: Path) -> None:
    """The same chunk twice in one get_chunks call (read once, its duplicate copied from it), rewritten and
    its old block reclaimed between the lookup and the read: both answers are the new text with the new
    meta. Before, the duplicate kept the first lookup's location (read_from) and so the old meta."""
    from blockstore import ChunkWrite
    from blockstore.compaction import attach

    with blockstore.open(tmp_path, block_size=MIB, max_open_blocks=1) as s:
        s.put_chunks([ChunkWrite("u", "s", "c", "old " * (150 << 10), meta={"version": 1})])
        rewritten: list[bool] = []

        def rewrite_under_the_reader(*_a: object) -> None:
            if rewritten:
                return
            rewritten.append(True)
            s.put_chunks([ChunkWrite("u", "s", "c", "new " * (150 << 10), meta={"version": 2})])  # seals the old block
            attach(s, {**AGGRESSIVE, "relocation": False}, background=False).run_until_idle()

        with hooks.installed("read.located", rewrite_under_the_reader):
            got = s.get_chunks([("u", "s", "c"), ("u", "s", "c")])
        assert rewritten and got[0] is not None and got[1] is not None
        assert [(g.text[:4], g.meta) for g in got] == [("new ", {"version": 2})] * 2
