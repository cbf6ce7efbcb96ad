"""Relocation that never makes reads worse (issue 16, shadow.py): before a cluster moves, the requests
that read its records are counted in blocks before and after; a record whose move costs its readers
more than it saves stays, and so does a record several groups read that would leave the records it
was written beside (the readers no request has shown yet)."""

from __future__ import annotations

from pathlib import Path

from compaction_helpers import AGGRESSIVE, MIB

import blockstore
from blockstore.compaction import attach
from blockstore.compaction.shadow import Shadow, blocks_read

RELOCATE_ONLY = {**AGGRESSIVE, "gc": False}
NEW = -100  # the block a move writes, in the shadow


def test_blocks_read_counts_a_record_with_copies_where_the_request_goes_anyway() -> None:
    places = {b"a": [1], b"b": [2], b"c": [3, 1]}
    assert blocks_read([b"a", b"b"], places) == 2
    assert blocks_read([b"a", b"c"], places) == 1  # c's copy sits in block 1, which a needs anyway
    assert blocks_read([b"b", b"c"], places) == 2
    assert blocks_read([b"a", b"gone"], places) == 1


def test_a_record_many_requests_read_with_records_that_stay_is_not_moved() -> None:
    # one request reads a (block 1) with b (block 2); four read a with c, which stays in block 1:
    # pulling a to b's new block saves the first a block and costs the four one each
    readers = [((b"a", b"b"), 1.0)] + [((b"a", b"c"), 1.0)] * 4
    shadow = Shadow(readers, {b"a": [1], b"b": [2], b"c": [1]})
    assert shadow.saving([b"a", b"b"], NEW) == 1 - 4
    assert shadow.worth_moving([b"a", b"b"], NEW) == []  # b alone saves no one a block either


def test_records_read_together_and_nowhere_else_move() -> None:
    readers = [((b"a", b"b", b"c"), 1.0)] * 3 + [((b"x", b"y"), 1.0)]
    shadow = Shadow(readers, {b"a": [1], b"b": [2], b"c": [3], b"x": [1], b"y": [1]})
    assert sorted(shadow.worth_moving([b"a", b"b", b"c"], NEW)) == [b"a", b"b", b"c"]
    assert shadow.saving([b"a", b"b", b"c"], NEW) == 3 * 2


def test_a_record_whose_move_buys_nothing_stays() -> None:
    # the request reads a and b from block 1 and c from block 2: moving c to block 1 saves a block,
    # moving d (read by no one) buys nothing and costs a write
    readers = [((b"a", b"b", b"c"), 1.0)] * 2
    shadow = Shadow(readers, {b"a": [1], b"b": [1], b"c": [2], b"d": [2]})
    assert shadow.worth_moving([b"c", b"d"], 1) == [b"c"]


def test_moved_records_are_where_the_next_estimate_looks() -> None:
    readers = [((b"a", b"b"), 1.0)] * 2
    shadow = Shadow(readers, {b"a": [1], b"b": [2]})
    shadow.moved([b"a", b"b"], NEW)
    assert shadow.worth_moving([b"a", b"b"], NEW - 1) == []  # together already: a second move saves nothing


def _doc_and_two_readers(s: blockstore.Store, chunks: int) -> list[bytes]:
    """A document of `chunks` chunks written in one call (side by side in one block), and two private
    records in partitions of their own (blocks of their own)."""
    doc = [b"doc/c%d" % i for i in range(chunks)]
    s.put_many([(k, k * 2000) for k in doc], partition="ingest")
    for owner in (b"p", b"q"):
        s.put(owner, owner * 50_000, partition=owner.decode())
        s.put(owner + b"-filler", b"f" * 10_000, partition=owner.decode())
    assert len({loc.block_id for loc in s.locate_many([*doc, b"p", b"q"]) if loc}) == 3
    return doc


def _relocate_after(s: blockstore.Store, mid: bytes, reads: int) -> tuple[int, int]:
    """`reads` times each, a request for `mid` with p's records and one with q's; then one pass: (clusters moved,
    clusters the shadow left)."""
    c = attach(s, RELOCATE_ONLY, background=False)
    for _ in range(reads):
        s.get_many([mid, b"p", b"p-filler"])  # two groups: the requests share a third of their records
        s.get_many([mid, b"q", b"q-filler"])
    rep = c.run_pass()
    c.stop()
    return rep.relocated_groups, rep.skipped_shadow


def test_a_shared_chunk_is_not_pulled_away_from_the_chunks_written_beside_it(tmp_path: Path) -> None:
    # the cluster {mid, p, q} saves each of the two requests a block, and pulls mid away from both its
    # neighbours: the requests to come that read it with them would pay as much, so it stays
    with blockstore.open(tmp_path, block_size=MIB) as s:
        mid = _doc_and_two_readers(s, chunks=5)[2]
        home = s.locate_many([mid])[0].block_id  # type: ignore[union-attr]
        assert _relocate_after(s, mid, reads=1) == (0, 1)
        assert s.locate_many([mid])[0].block_id == home  # type: ignore[union-attr]


def test_requests_that_keep_coming_outweigh_the_neighbours(tmp_path: Path) -> None:
    with blockstore.open(tmp_path, block_size=MIB) as s:
        mid = _doc_and_two_readers(s, chunks=5)[2]
        assert _relocate_after(s, mid, reads=3) == (1, 0)
        assert len({loc.block_id for loc in s.locate_many([mid, b"p", b"q"]) if loc}) == 1


def test_a_chunk_without_neighbours_moves_with_its_readers(tmp_path: Path) -> None:
    # the same reads, but the chunk was written alone: nothing it was written beside to leave
    with blockstore.open(tmp_path, block_size=MIB) as s:
        (mid,) = _doc_and_two_readers(s, chunks=1)
        assert _relocate_after(s, mid, reads=1) == (1, 0)
        assert len({loc.block_id for loc in s.locate_many([mid, b"p", b"q"]) if loc}) == 1


def test_the_prior_takes_records_out_of_a_move_but_does_not_veto_it() -> None:
    # a session's records a, b (blocks 1, 2) are read together twice with chunk c (block 3); c was
    # written beside d, which stays: the prior's readers (c, d) keep c home, and a, b still move
    shadow = Shadow([((b"a", b"b", b"c"), 1.0)] * 2, {b"a": [1], b"b": [2], b"c": [3], b"d": [3]})
    for _ in range(2):
        shadow.add_reader((b"c", b"d"), 1.0, {})
    assert shadow.worth_moving([b"a", b"b", b"c"], NEW) == [b"a", b"b"]
    # a and b each have a neighbour too (x, y): each is worth moving (the two requests outweigh one
    # neighbour), and the move saves the requests seen two blocks while costing the prior's readers two.
    # Judged with the prior the move is a wash and was vetoed; judged by the requests seen it is made
    both = Shadow([((b"a", b"b"), 1.0)] * 2, {b"a": [1], b"b": [2], b"x": [1], b"y": [2]})
    both.add_reader((b"a", b"x"), 1.0, {})
    both.add_reader((b"b", b"y"), 1.0, {})
    assert both.saving([b"a", b"b"], NEW) == 0
    assert both.worth_moving([b"a", b"b"], NEW) == [b"a", b"b"]
    # the prior's readers alone never make a move: with nothing seen to save, nothing moves
    lone = Shadow([], {b"c": [3], b"d": [3]})
    lone.add_reader((b"c", b"d"), 1.0, {})
    assert lone.worth_moving([b"c"], NEW) == []
