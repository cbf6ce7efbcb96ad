"""Placement choice (blockstore/placement_choice.py, issue 16): a namespace whose requests read what
several of its partitions wrote is placed as one lineage; one whose requests read what one partition
wrote keeps its partitions; a store of one namespace never becomes one stream; memory stays
bounded. The unit tests drive the scorer with appends and reads directly (the store's leader and
reader do the same); the store test goes through the public API."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import blockstore
from blockstore.placement_choice import PlacementChoice

BLOCK = 4 << 20


@dataclass
class Place:  # what observe reads of a Location
    block_id: int
    offset: int


class Replay:
    """Appends in a fake block space (each partition's own block, as placement by partition does) and
    reads through `observe`, as the store's leader and reader call the scorer."""

    def __init__(self, choice: PlacementChoice) -> None:
        self.choice = choice
        self.where: dict[bytes, Place] = {}
        self.offsets: dict[bytes, int] = {}
        self.block_of: dict[bytes, int] = {}

    def put(self, key: bytes, partition: bytes, nbytes: int) -> None:
        placed = self.choice.resolve(partition)
        bid = self.block_of.setdefault(placed, len(self.block_of))
        off = self.offsets.get(placed, 4096)
        self.offsets[placed] = off + nbytes
        self.where[key] = Place(bid, off)
        self.choice.note_append(bid, off, partition, nbytes)

    def read(self, keys: list[bytes]) -> None:
        self.choice.observe(keys, [self.where[k] for k in keys])  # type: ignore[misc]


def tenants_reading_across_conversations(choice: PlacementChoice, tenants: int = 20, rounds: int = 40) -> Replay:
    """Each tenant (namespace) has conversations (partitions); each turn reads the conversation's last
    records plus notes other conversations of the tenant just wrote."""
    rng = random.Random(3)
    r = Replay(choice)
    notes: dict[int, list[bytes]] = {t: [] for t in range(tenants)}
    own: dict[tuple[int, int], list[bytes]] = {}
    for i in range(rounds * tenants):
        t, c = rng.randrange(tenants), rng.randrange(4)
        part = b"tenant%03d\0conv%d" % (t, c)
        mine = own.setdefault((t, c), [])
        if len(mine) + len(notes[t]) >= 2:
            r.read(mine[-3:] + notes[t][-3:])
        kv, note = b"%d/kv%d" % (t, i), b"%d/note%d" % (t, i)
        r.put(kv, part, 100_000)
        r.put(note, part, 4_000)
        mine.append(kv)
        notes[t].append(note)
    return r


def test_a_namespace_read_across_its_partitions_is_placed_as_one() -> None:
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    tenants_reading_across_conversations(choice)
    assert choice.default_by_namespace
    assert choice.resolve(b"tenant001\0conv2") == b"tenant001"
    assert choice.resolve(b"tenant999\0new") == b"tenant999"  # a tenant never read yet follows the rest
    assert choice.resolve(b"\0compaction/relocate") == b"\0compaction/relocate"  # compaction's streams stay
    # the L2 adapter's tombstone stream stays out of the namespace's data blocks (H24's review)
    assert choice.resolve(b"tenant001\0conv2\0tombstones") == b"tenant001\0conv2\0tombstones"


def test_partitions_read_on_their_own_keep_their_lineages() -> None:
    """Tasks that read their own outputs (and one page another task wrote) stay placed by partition."""
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    rng = random.Random(5)
    r = Replay(choice)
    outs: dict[bytes, list[bytes]] = {}
    for i in range(3000):
        ns = b"site%d" % rng.randrange(10)
        part = ns + b"\0task%d" % rng.randrange(8)
        mine = outs.setdefault(part, [])
        if len(mine) >= 2:
            r.read(mine[-8:])
        key = b"%s/o%d" % (part, i)
        r.put(key, part, 20_000)
        mine.append(key)
    assert not choice.default_by_namespace and not choice.by_namespace
    assert choice.resolve(b"site1\0task3") == b"site1\0task3"


def test_a_store_of_one_namespace_keeps_its_partitions() -> None:
    """One namespace for everything (what a caller gets without namespaces): one lineage would be a
    plain log, so however its requests cross partitions, its partitions stay."""
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    rng = random.Random(9)
    r = Replay(choice)
    keys: list[bytes] = []
    for i in range(3000):
        if len(keys) >= 120:
            r.read(rng.sample(keys[-120:], 4))
        keys.append(b"k%d" % i)
        r.put(keys[-1], b"ns0\0s%d" % rng.randrange(30), 8_000)
    assert not choice.default_by_namespace and not choice.by_namespace
    assert choice.resolve(b"ns0\0s1") == b"ns0\0s1"


def test_a_namespace_whose_lineage_stops_paying_goes_back_to_its_partitions() -> None:
    """A namespace writing most of the bytes is scored like any other, all along: while its requests read
    what its partitions just wrote it is one lineage; once they read each partition's own records over
    a span in which the others interleave, it goes back to its partitions. (A namespace over an eighth
    of the bytes used not to be scored, and one that crossed that bound kept its mode for good.)"""
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    rng = random.Random(13)
    r = Replay(choice)
    own: dict[bytes, list[bytes]] = {}
    recent: list[bytes] = []
    for i in range(600):  # phase 1: reads mix records every partition just wrote
        part = b"big\0s%d" % rng.randrange(8)
        if len(recent) >= 8:
            r.read(rng.sample(recent[-16:], 4))
        key = b"a%d" % i
        r.put(key, part, 30_000)
        recent.append(key)
        if i % 20 == 0:
            r.put(b"small%d" % i, b"small\0s0", 2_000)  # a second namespace: the store has a choice
    assert b"big" in choice.by_namespace
    one = choice.resolve(b"big\0s3")  # one lineage (the store's first namespace continues a partition's block)
    assert one != b"big\0s3" and choice.resolve(b"big\0s5") == one
    for i in range(3000):  # phase 2: each request reads one partition's last 8 records
        p = rng.randrange(8)
        part = b"big\0s%d" % p
        mine = own.setdefault(part, [])
        if len(mine) >= 8:
            r.read(mine[-8:])
        key = b"b%d" % i
        r.put(key, part, 100_000)
        mine.append(key)
    assert b"big" not in choice.by_namespace
    assert choice.resolve(b"big\0s3") == b"big\0s3"


def test_a_store_of_one_namespace_labels_nothing() -> None:
    """Nothing per record is kept for a namespace that is never scored (the adapter's store: one
    namespace; per-record state there failed tests/test_connector_adapter.py's memory bound)."""
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    for i in range(2000):
        choice.note_append(i // 100, 4096 + (i % 100) * 8192, b"lmcache\0chat%d" % (i % 7), 8000)
    assert not choice._labels and not choice._by_ns.state and not choice._by_partition.state


def test_memory_stays_bounded() -> None:
    choice = PlacementChoice(block_size=BLOCK, max_names=64, max_labels=500)
    r = tenants_reading_across_conversations(choice, tenants=300, rounds=10)
    assert len(choice._labels) <= 500
    assert len(choice._by_ns.state) <= 64 and len(choice._by_partition.state) <= 64
    assert len(choice._score) <= 64 and len(choice._written) <= 64
    assert choice.by_namespace <= set(choice._score)
    assert len(r.where) == 2 * 300 * 10  # every record was written (the bounds only forget evidence)


def test_a_store_places_a_tenant_read_across_partitions_as_one(tmp_path: Path) -> None:
    """Through the public API: tenants' conversations whose requests read each other's notes end up
    writing into one lineage per tenant (a new conversation's records land in its tenant's block), and
    every record reads back."""
    rng = random.Random(11)
    written: dict[tuple[str, bytes], bytes] = {}
    with blockstore.open(tmp_path, block_size=4 << 20, max_open_blocks=64, idle_seal_seconds=0) as s:
        notes: dict[str, list[bytes]] = {}
        for i in range(600):
            ns = f"tenant{rng.randrange(8)}"
            conv = f"conv{rng.randrange(6)}"
            mine = notes.setdefault(ns, [])
            if len(mine) >= 3:
                got = s.get_many(mine[-4:], ns=ns)
                assert [bytes(g) for g in got if g is not None] == [written[(ns, k)] for k in mine[-4:]]
            key, value = b"note%d" % i, rng.randbytes(rng.randint(1000, 8000))
            s.put_many([(key, value)], ns=ns, partition=conv)
            written[(ns, key)] = value
            mine.append(key)
        # two new conversations of one tenant: their records go where the tenant writes
        s.put_many([(b"new-a", b"a" * 3000)], ns="tenant0", partition="fresh-a")
        s.put_many([(b"new-b", b"b" * 3000)], ns="tenant0", partition="fresh-b")
        a, b = s.locate_many([b"new-a", b"new-b"], ns="tenant0")
        assert a is not None and b is not None and a.block_id == b.block_id
        for (ns, key), value in written.items():
            assert s.get(key, ns=ns) == value


def test_a_small_namespace_is_one_lineage_until_it_has_written_a_block() -> None:
    """Before any read: in a store of several namespaces, a namespace's partitions share one lineage
    until the namespace has written a block (split, they could only spread what fits one block). The
    store's first namespace keeps its partitions while it is the only one; if a second comes while it
    is still small, it continues the block its last partition writes to."""
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    r = Replay(choice)
    r.put(b"a0", b"first\0s0", 100_000)
    r.put(b"a1", b"first\0s1", 100_000)
    assert r.where[b"a0"].block_id != r.where[b"a1"].block_id  # one namespace: its partitions' own lineages
    for i in range(30):  # a second namespace: 3 MB over three conversations
        r.put(b"t%d" % i, b"tenant\0conv%d" % (i % 3), 100_000)
    assert len({r.where[b"t%d" % i].block_id for i in range(30)}) == 1
    r.put(b"a2", b"first\0s0", 100_000)
    assert r.where[b"a2"].block_id == r.where[b"a1"].block_id
    for i in range(30, 50):  # past a block: each conversation its own lineage again
        r.put(b"t%d" % i, b"tenant\0conv%d" % (i % 3), 100_000)
    assert choice.resolve(b"tenant\0conv1") == b"tenant\0conv1"
    assert len({r.where[b"t%d" % i].block_id for i in range(45, 50)}) == 3


def test_a_first_namespace_past_a_block_keeps_its_partitions() -> None:
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    r = Replay(choice)
    for i in range(50):
        r.put(b"a%d" % i, b"first\0s%d" % (i % 2), 100_000)
    r.put(b"t0", b"tenant\0conv0", 100_000)
    assert choice.resolve(b"first\0s0") == b"first\0s0"
    assert choice.resolve(b"tenant\0conv1") == b"tenant"


def test_many_small_tenants_write_each_tenant_into_one_block(tmp_path: Path) -> None:
    """Through the public API, no reads: 40 tenants (namespaces) of 4 conversations each, interleaved,
    160 partitions on 64 open blocks. Each tenant's records land in one block (its namespace's
    lineage), not in a block per conversation (by partition: 2.6 blocks a tenant)."""
    rng = random.Random(17)
    with blockstore.open(tmp_path, block_size=4 << 20, max_open_blocks=64, idle_seal_seconds=0) as s:
        keys: dict[str, list[bytes]] = {}
        for i in range(1600):
            t = rng.randrange(40)
            key = b"k%d" % i
            s.put_many([(key, rng.randbytes(rng.randint(2000, 30000)))], ns=f"t{t}", partition=f"c{rng.randrange(4)}")
            keys.setdefault(f"t{t}", []).append(key)
        spread = [len({loc.block_id for loc in s.locate_many(ks, ns=ns) if loc is not None}) for ns, ks in keys.items()]
    assert sum(spread) / len(spread) <= 1.2, spread
