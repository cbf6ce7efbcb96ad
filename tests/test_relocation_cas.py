"""The compare-and-swap re-point that compaction is built on (invariant 3).

The Badger 2310 shape: a relocation reads a record, and before it re-points the key, a writer deletes
or overwrites that key. The relocation must then do nothing: the key stays deleted / new.
"""

from __future__ import annotations

import threading
from pathlib import Path

import blockstore
from blockstore import hooks
from blockstore.keys import SPACE_KV, key_suffix


def _victims(s: blockstore.Store, bid: int) -> list[tuple[bytes, object]]:
    moves = []
    for _off, suffix in s.dir.block_records(bid):
        loc = s.dir.get_locations([suffix])[0]
        moves.append((suffix, loc))
    return moves


def test_relocation_moves_live_records_and_keeps_bytes(tmp_path: Path, backend: str) -> None:
    with blockstore.open(tmp_path, block_size=1 << 20, backend=backend) as s:
        vals = {b"k%d" % i: bytes([i]) * 50_000 for i in range(10)}
        s.put_many(list(vals.items()))
        old = s.locate_many(list(vals))
        bid = old[0].block_id
        moves = _victims(s, bid)
        payloads = s.read_locations([loc for _s, loc in moves])
        done = s.relocate_many([(sfx, loc, p) for (sfx, loc), p in zip(moves, payloads)], partition=b"compaction")
        assert all(done) and len(done) == 10
        new = s.locate_many(list(vals))
        assert all(n.block_id != bid for n in new)
        assert [n.seq for n in new] == [o.seq for o in old]  # same records, new place
        assert [s.get(k) for k in vals] == list(vals.values())
        st = s.stats()
        assert st.records == 10
        assert st.write_amplification > 1.9  # every byte written twice
    # the emptied block was reclaimed, and the moves survive a reopen
    with blockstore.open(tmp_path, backend=backend) as s:
        assert bid not in {e.block_id for e in s.block_table()}
        assert [s.get(k) for k in vals] == list(vals.values())


def test_relocation_of_a_key_deleted_meanwhile_does_not_resurrect_it(tmp_path: Path) -> None:
    with blockstore.open(tmp_path) as s:
        s.put(b"victim", b"old bytes")
        s.put(b"bystander", b"stays")
        sfx = key_suffix(s.namespace_id("default"), SPACE_KV, b"victim")  # type: ignore[arg-type]
        loc = s.dir.get_locations([sfx])[0]
        payload = s.read_locations([loc])[0]  # the compactor has copied the bytes ...
        assert s.delete(b"victim")  # ... and now the key is deleted
        assert s.relocate_many([(sfx, loc, payload)], partition=b"gc") == [False]
        assert s.get(b"victim") is None
    with blockstore.open(tmp_path) as s:
        assert s.get(b"victim") is None
        assert s.get(b"bystander") == b"stays"


def test_relocation_racing_an_overwrite_in_another_thread(tmp_path: Path) -> None:
    """Pause the relocation at the write path's first hook; overwrite the key from another thread
    meanwhile; the overwrite must win whichever order the group commit picks."""
    with blockstore.open(tmp_path) as s:
        s.put(b"k", b"v1")
        sfx = key_suffix(s.namespace_id("default"), SPACE_KV, b"k")  # type: ignore[arg-type]
        loc = s.dir.get_locations([sfx])[0]
        payload = s.read_locations([loc])[0]
        paused, resume = threading.Event(), threading.Event()
        first = [True]

        def pause(*_a: object) -> None:
            if first[0] and threading.current_thread().name == "relocator":
                first[0] = False
                paused.set()
                resume.wait(5)

        result: list[bool] = []
        with hooks.installed("write.begin", pause):
            t = threading.Thread(target=lambda: result.extend(s.relocate_many([(sfx, loc, payload)], partition=b"gc")),
                                 name="relocator")
            t.start()
            assert paused.wait(5)
            w = threading.Thread(target=lambda: s.put(b"k", b"v2"))
            w.start()  # queued behind the paused leader: it commits after the move
            resume.set()
            t.join(5)
            w.join(5)
        assert result == [True]  # the move saw v1 still in place
        assert s.get(b"k") == b"v2"  # and the later overwrite is what remains
    with blockstore.open(tmp_path) as s:
        assert s.get(b"k") == b"v2"
        assert s.stats().records == 1

