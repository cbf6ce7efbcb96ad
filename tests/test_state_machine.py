"""Stateful property test: the store against a dict, through puts, updates, deletes, batched reads,
reopens, crashes and compaction passes, in both durability modes and on both backends.

Compaction (blockstore.compaction): every store the machine opens has a compactor attached
(background=False, aggressive thresholds) that learns co-access from every batched read; `compact` runs
a pass, or passes until idle; `get_group` repeats a few overlapping key groups so that relocation has
groups to co-locate; `reopen_after_compaction` compacts, closes, and reopens through
`blockstore.open(..., compaction=...)`, which must load the affinity groups it persisted. After every
compaction the model must hold exactly, and (unless a cache-mode power loss has dropped unsynced
tombstones) a directory rebuilt from the block files alone must agree with the store's.

Crash models:
- `crash_kill`: the store is dropped without sealing or marking clean, as kill -9 leaves it (every
  write that reached the OS survives). Every acknowledged operation must survive, in both modes.
- `crash_power` (native backend only): additionally every block-file byte not yet fdatasync'ed is
  dropped, or torn at a random 512-byte boundary, through the C core's fault layer. In `sync` mode
  every acknowledged operation must survive; in `cache` mode a key may come back missing (a lost
  recent put) but never with other bytes than its last acknowledged value, and a deleted key never
  comes back.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from compaction_helpers import AGGRESSIVE, rebuild_violations
from hypothesis import event, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

import blockstore
from blockstore.compaction import Compactor, attach
from blockstore.directory import Location
from blockstore.keys import SPACE_KV, key_suffix
from blockstore.native import FaultInjector

# copies of shared records (docs/copies.md): placed by the compactor and by the copy rules below
COMPACTION = {**AGGRESSIVE, "max_copies": 1}

KEYS = st.sampled_from([b"k%d" % i for i in range(12)])
NAMESPACES = st.sampled_from(["default", "tenant-b"])
# mostly small values, some large enough to fill the 1 MiB test blocks in a few records
# Large values are drawn as (size, seed) so they cost little entropy; their bytes are still distinct.
def _sized(lo: int, hi: int) -> st.SearchStrategy[bytes]:
    return st.tuples(st.integers(lo, hi), st.integers(0, 2**32)).map(lambda t: random.Random(t[1]).randbytes(t[0]))


VALUES = st.one_of(st.binary(max_size=64), _sized(4000, 5000), _sized(100_000, 300_000))
# the requests a client repeats (a conversation's chunks): what relocation co-locates; they overlap
GROUPS = st.sampled_from([[b"k0", b"k1", b"k2"], [b"k3", b"k4", b"k5", b"k6"], [b"k2", b"k7", b"k8", b"k9"],
                          [b"k1", b"k10", b"k11"]])


class StoreMachine(RuleBasedStateMachine):
    durability = "cache"
    backend = "native"

    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bs-sm-")
        self.model: dict[tuple[str, bytes], bytes] = {}
        self.faults = FaultInjector() if self.backend == "native" else None
        self.unsynced_lost = False  # a cache-mode power loss may drop tombstones a rebuild needs
        if self.faults:
            self.faults.install()
        self.store = self._open()

    def _open(self) -> blockstore.Store:
        s = blockstore.open(self.dir, durability=self.durability, block_size=1 << 20,
                            max_open_blocks=3, backend=self.backend)
        # a compactor that runs only when a rule asks, but learns from every read from the start
        s.compactor = attach(s, COMPACTION, background=False)
        return s

    def teardown(self) -> None:
        try:
            self.store.close()
        finally:
            if self.faults:
                self.faults.uninstall()
            shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        pass

    @rule(ns=NAMESPACES, key=KEYS, value=VALUES)
    def put(self, ns: str, key: bytes, value: bytes) -> None:
        self.store.put(key, value, ns=ns)
        self.model[(ns, key)] = value

    @rule(ns=NAMESPACES, items=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=6),
          partition=st.sampled_from([None, "req-1", "req-2"]))
    def put_many(self, ns: str, items: list[tuple[bytes, bytes]], partition: str | None) -> None:
        self.store.put_many(items, ns=ns, partition=partition)
        for k, v in items:
            self.model[(ns, k)] = v

    @rule(ns=NAMESPACES, key=KEYS)
    def delete(self, ns: str, key: bytes) -> None:
        existed = self.store.delete(key, ns=ns)
        assert existed == ((ns, key) in self.model)
        self.model.pop((ns, key), None)

    @rule(ns=NAMESPACES, key=KEYS)
    def get(self, ns: str, key: bytes) -> None:
        assert self.store.get(key, ns=ns) == self.model.get((ns, key))

    @rule(ns=NAMESPACES, keys=st.lists(KEYS, min_size=1, max_size=8, unique=True), into=st.booleans())
    def get_many(self, ns: str, keys: list[bytes], into: bool) -> None:
        if into:
            out = [bytearray(300_000) for _ in keys]
            lens = self.store.get_many(keys, ns=ns, out=out)
            got = [None if n is None else bytes(o[:n]) for o, n in zip(out, lens)]
        else:
            got = [None if v is None else bytes(v) for v in self.store.get_many(keys, ns=ns)]
        assert got == [self.model.get((ns, k)) for k in keys]

    @rule(pick=st.integers(min_value=0, max_value=10**6), stale=st.booleans())
    def relocate_block(self, pick: int, stale: bool) -> None:
        """Move one block's live records elsewhere through the compare-and-swap primitive; with
        `stale`, the first key is overwritten between the copy and the re-point: its move must fail."""
        blocks = [e.block_id for e in self.store.block_table() if e.live_records]
        if not blocks:
            return
        bid = blocks[pick % len(blocks)]
        # a key with two places in the block (a copy beside its primary) is moved once
        entries = list({sfx: (off, sfx) for off, sfx in self.store.dir.block_records(bid)}.values())
        locs = self.store.dir.get_locations([sfx for _off, sfx in entries])
        payloads = self.store.read_locations([loc for loc in locs if loc is not None])
        moves = [(sfx, loc, p) for (_o, sfx), loc, p in zip(entries, locs, payloads)]
        if stale and moves:
            sfx = moves[0][0]
            ns = "default" if self.store.namespace_id("default") == int.from_bytes(sfx[:4], "big") else "tenant-b"
            if sfx[4] == 1:  # a KV record: overwrite it under the compactor's feet
                self.store.put(sfx[5:], b"newer", ns=ns)
                self.model[(ns, sfx[5:])] = b"newer"
        done = self.store.relocate_many(moves, partition=b"relocation")
        if stale and moves and moves[0][0][4] == 1:
            assert done[0] is False
        assert all(done[1:])

    # ---- copies (docs/copies.md) ----

    def _value(self, ns: str, key: bytes) -> tuple[bytes, Location | None]:
        nid = self.store.namespace_id(ns)
        sfx = key_suffix(nid or 0, SPACE_KV, key)
        return sfx, (self.store.dir.get_locations([sfx])[0] if nid else None)

    @rule(ns=NAMESPACES, key=KEYS)
    def place_copy(self, ns: str, key: bytes) -> None:
        sfx, value = self._value(ns, key)
        if value is None or len(value.copies) >= 2:
            return
        payload = self.store.read_locations([value.primary()])[0]
        assert self.store.place_copies([(sfx, value, payload)], partition=b"copies") == [True]
        event("copies: placed")

    @rule(ns=NAMESPACES, key=KEYS, value=VALUES, delete=st.booleans())
    def copy_racing_a_write(self, ns: str, key: bytes, value: bytes, delete: bool) -> None:
        """A copy computed from the value as it was, after a put or delete of the key: it must write
        nothing, and no read may ever return the old bytes (invariant 8)."""
        sfx, old = self._value(ns, key)
        if old is None:
            return
        payload = self.store.read_locations([old.primary()])[0]
        if delete:
            self.store.delete(key, ns=ns)
            self.model.pop((ns, key), None)
        else:
            self.store.put(key, value, ns=ns)
            self.model[(ns, key)] = value
        assert self.store.place_copies([(sfx, old, payload)], partition=b"copies") == [False]
        assert self.store.get(key, ns=ns) == self.model.get((ns, key))

    @rule(ns=NAMESPACES, key=KEYS, which=st.integers(0, 3))
    def drop_copy(self, ns: str, key: bytes, which: int) -> None:
        sfx, value = self._value(ns, key)
        if value is None or not value.copies:
            return
        place = value.places()[which % len(value.places())]
        assert self.store.place_copies([], partition=b"copies", drops=[(sfx, value, place)]) == [True]
        event("copies: dropped")

    @invariant()
    def every_place_holds_the_value(self) -> None:
        """Each place a value names (primary and copies) reads back as the model's bytes."""
        for ns in ("default", "tenant-b"):
            for k in [b"k%d" % i for i in range(12)]:
                _sfx, value = self._value(ns, k)
                if value is not None and value.copies:
                    got = self.store.read_locations(value.places())
                    assert all(bytes(g) == self.model[(ns, k)] for g in got), (ns, k, "a stale copy")

    # ---- compaction ----

    def _compactor(self) -> Compactor:
        c = self.store.compactor  # close() and abandon() stop it
        assert isinstance(c, Compactor)
        return c

    def _check_compacted(self) -> None:
        self._check_all(exact=True)
        if not self.unsynced_lost:
            assert rebuild_violations(self.store) == []

    @rule(until_idle=st.booleans())
    def compact(self, until_idle: bool) -> None:
        c = self._compactor()
        rep = c.run_until_idle(max_passes=4) if until_idle else c.run_pass()
        assert rep.lost_races == 0  # nothing races a pass run on this thread
        for what in ("relocated_groups", "gc_blocks", "reclaimed_blocks", "tombstones_carried", "tombstones_dropped"):
            if getattr(rep, what):
                event(f"compaction: {what}")
        self._check_compacted()

    @rule(ns=NAMESPACES, keys=GROUPS)
    def get_group(self, ns: str, keys: list[bytes]) -> None:
        got = [None if v is None else bytes(v) for v in self.store.get_many(keys, ns=ns)]
        assert got == [self.model.get((ns, k)) for k in keys]

    @rule()
    def reopen_after_compaction(self) -> None:
        c = self._compactor()
        c.run_pass()
        groups = c.status()["groups_tracked"]
        self.store.close()
        self.store = blockstore.open(self.dir, durability=self.durability, block_size=1 << 20, max_open_blocks=3,
                                     backend=self.backend, compaction={**COMPACTION, "background": False})
        assert self.store.recovery_report is None
        assert self._compactor().status()["groups_tracked"] == groups  # what it learned was persisted
        self._check_compacted()
        self._compactor().run_pass()
        self._check_compacted()

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = self._open()
        assert self.store.recovery_report is None  # a clean close never needs a scan

    @rule()
    def crash_kill(self) -> None:
        self.store.abandon()
        self.store = self._open()
        self._check_all(exact=True)

    @precondition(lambda self: self.backend == "native")
    @rule(torn_seed=st.one_of(st.just(0), st.integers(min_value=1, max_value=2**32)))
    def crash_power(self, torn_seed: int) -> None:
        self.store.abandon()
        assert self.faults is not None
        self.faults.crash(torn_seed)
        self.unsynced_lost |= self.durability == "cache"
        self.store = self._open()
        self._check_all(exact=self.durability == "sync")

    def _check_all(self, exact: bool) -> None:
        for ns in ("default", "tenant-b"):
            keys = [b"k%d" % i for i in range(12)]
            got = [None if v is None else bytes(v) for v in self.store.get_many(keys, ns=ns)]
            for k, g in zip(keys, got):
                want = self.model.get((ns, k))
                if exact or want is None:
                    assert g == want, (ns, k, "lost or resurrected")
                else:
                    assert g in (want, None), (ns, k, "wrong bytes after crash")
                    if g is None:
                        del self.model[(ns, k)]  # a lost recent put: allowed in cache mode

    @invariant()
    def stats_agree_with_model(self) -> None:
        st_ = self.store.stats()
        copies = sum(len(loc.copies) for ns in ("default", "tenant-b") if self.store.namespace_id(ns)
                     for _k, loc in self.store.iter_locations(ns=ns))
        assert st_.records == len(self.model) + copies  # stats count places (docs/copies.md)
        assert st_.live_logical_bytes == sum(len(k) + len(v) for (_ns, k), v in self.model.items())

    @invariant()
    def keys_listed(self) -> None:
        for ns in ("default", "tenant-b"):
            assert sorted(self.store.iter_keys(ns=ns)) == sorted(k for (n, k) in self.model if n == ns)


def _machine(durability: str, backend: str) -> type[StoreMachine]:
    return type(f"Store_{durability}_{backend}", (StoreMachine,), {"durability": durability, "backend": backend})


@pytest.mark.parametrize("durability", ["cache", "sync"])
@pytest.mark.parametrize("backend_name", ["native", "python"])
def test_store_matches_dict_model(durability: str, backend_name: str) -> None:
    machine = _machine(durability, backend_name)
    machine.TestCase.settings = settings(settings.default)
    machine.TestCase().runTest()


@pytest.mark.parametrize("durability", ["cache", "sync"])
def test_a_clean_close_is_durable(tmp_path: Path, faults: FaultInjector, durability: str) -> None:
    """close() marks the store clean, after which no recovery runs: so everything must be synced by
    then, including blocks that rotated out unsynced in cache mode. A power loss right after close
    (every unsynced byte dropped) must lose nothing."""
    values = {b"k%d" % i: random.Random(i).randbytes(300_000) for i in range(20)}
    with blockstore.open(tmp_path, durability=durability, block_size=1 << 20) as s:
        for k, v in values.items():
            s.put(k, v)
        assert len(s.block_table()) >= 5  # several blocks rotated out during the session
    faults.crash()
    with blockstore.open(tmp_path, durability=durability, block_size=1 << 20) as s:
        assert s.recovery_report is None
        assert {k: s.get(k) for k in values} == values
