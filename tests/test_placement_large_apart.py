"""Placement choice (blockstore/placement_choice.py, issue 16, H77): a namespace placed as one lineage gets a
second lineage for its large records (1/16 of a block or more) where its reads favour it by the same shares as
the modes: requests drawing among many small records of the namespace, which large ones spread over many
blocks. Where requests read the newest records of both sizes together it stays one lineage. A relocated
cluster (size 0 to resolve) is never sent apart."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import blockstore
from blockstore.placement_choice import PlacementChoice

BLOCK = 4 << 20
SMALL, LARGE = 8_000, 600_000  # LARGE >= BLOCK // 16


@dataclass
class Place:  # what observe reads of a Location
    block_id: int
    offset: int


class Replay:
    """Appends into the blocks the choice resolves each record to (a lineage fills blocks in append order)
    and reads through `observe`, as the store's leader and reader call the scorer."""

    def __init__(self, choice: PlacementChoice) -> None:
        self.choice = choice
        self.where: dict[bytes, Place] = {}
        self.tail: dict[bytes, tuple[int, int]] = {}  # lineage -> (block, bytes in it)
        self.blocks = 0

    def put(self, key: bytes, partition: bytes, nbytes: int) -> None:
        lineage = self.choice.resolve(partition, nbytes)
        bid, used = self.tail.get(lineage, (-1, BLOCK))
        if used + nbytes > BLOCK:
            bid, used = self.blocks, 4096
            self.blocks += 1
        self.tail[lineage] = (bid, used + nbytes)
        self.where[key] = Place(bid, used)
        self.choice.note_append(bid, used, partition, nbytes)

    def read(self, keys: list[bytes]) -> int:
        self.choice.observe(keys, [self.where[k] for k in keys])  # type: ignore[misc]
        return len({self.where[k].block_id for k in keys})


def tenants(choice: PlacementChoice, *, draw: bool, rounds: int = 60, n: int = 6) -> tuple[Replay, list[int]]:
    """`n` tenants (namespaces) of 4 sessions (partitions); a step writes two small records and a large one
    into its session. Its request reads the four newest small records of the tenant (any session wrote them:
    the tenant is placed as one lineage) and then, with `draw`, three small records of the tenant drawn at
    random; without, the session's newest large record (what was just written, both sizes)."""
    rng = random.Random(5)
    r = Replay(choice)
    small: dict[int, list[bytes]] = {t: [] for t in range(n)}
    large: dict[tuple[int, int], list[bytes]] = {}
    read: list[int] = []
    for i in range(rounds * n):
        t, s = rng.randrange(n), rng.randrange(4)
        part = b"tenant%02d\0session%d" % (t, s)
        mine = large.setdefault((t, s), [])
        if len(small[t]) >= 8:
            keys = small[t][-4:]
            keys += rng.sample(small[t], 3) if draw else mine[-1:]
            read.append(r.read(list(dict.fromkeys(keys))))
        for j in range(2):
            k = b"%d/small%d.%d" % (t, i, j)
            r.put(k, part, SMALL)
            small[t].append(k)
        k = b"%d/large%d" % (t, i)
        r.put(k, part, LARGE)
        mine.append(k)
    return r, read


def test_a_namespace_drawing_among_small_records_puts_its_large_ones_apart() -> None:
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    _r, read = tenants(choice, draw=True)
    assert choice.large_apart and choice.large_apart <= choice.by_namespace
    ns = sorted(choice.large_apart)[-1]  # (the store's first namespace, tenant00, continues the lineage it began in)
    assert choice.resolve(ns + b"\0session1", LARGE) == ns + b"\0\0\0large"
    assert choice.resolve(ns + b"\0session1", SMALL) == ns  # small records stay in the namespace's lineage
    assert choice.resolve(ns + b"\0session1", 0) == ns  # a relocated cluster is never sent apart
    # and the reads gained: the last requests touch fewer blocks than with no lineage apart
    whole = PlacementChoice(block_size=BLOCK, max_names=1024)
    whole.large = BLOCK + 1
    _r, read_whole = tenants(whole, draw=True)
    assert not whole.large_apart
    assert sum(read[-100:]) < 0.75 * sum(read_whole[-100:])


def test_a_namespace_reading_its_newest_records_of_both_sizes_stays_one_lineage() -> None:
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    tenants(choice, draw=False)
    assert choice.by_namespace and not choice.large_apart
    for ns in choice.by_namespace:  # (the store's first namespace continues the lineage it began in)
        assert choice.resolve(ns + b"\0session1", LARGE) == choice.resolve(ns + b"\0session1", SMALL)


def test_a_store_puts_a_drawing_tenants_large_records_in_blocks_of_their_own(tmp_path: Path) -> None:
    rng = random.Random(9)
    written: dict[str, dict[bytes, int]] = {}
    with blockstore.open(tmp_path / "s", block_size=1 << 20) as st:  # large: 64 KiB or more
        small: dict[str, list[bytes]] = {}
        for i in range(900):
            ns = f"t{rng.randrange(4)}"
            pool = small.setdefault(ns, [])
            if len(pool) >= 8:
                st.get_many(list(dict.fromkeys(pool[-4:] + rng.sample(pool, 3))), ns=ns)
            items = [(b"s%d" % i, b"a" * 2000), (b"t%d" % i, b"b" * 2000), (b"L%d" % i, b"c" * 150_000)]
            st.put_many(items, ns=ns, partition=f"session{rng.randrange(4)}")
            written.setdefault(ns, {}).update((k, len(v)) for k, v in items)
            pool += [k for k, _v in items[:2]]
        locs = st.locate_many([b"s%d" % i for i in range(600, 900)] + [b"L%d" % i for i in range(600, 900)], ns="t0")
        small_blocks = {loc.block_id for loc in locs[:300] if loc is not None}
        large_blocks = {loc.block_id for loc in locs[300:] if loc is not None}
        assert small_blocks and large_blocks and not small_blocks & large_blocks
    with blockstore.open(tmp_path / "s", block_size=1 << 20) as st:  # every record reads back after a reopen
        for ns, sizes in written.items():
            got = st.get_many(list(sizes), ns=ns)
            assert [None if v is None else len(v) for v in got] == list(sizes.values())
