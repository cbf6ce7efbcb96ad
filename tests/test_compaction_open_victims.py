"""GC takes an open block past its invalid ratio that nothing was appended to since the previous pass:
it is sealed, then collected like a sealed victim (gc.victims, gc.seal_for_gc). Before, GC took sealed
blocks only, and a block stays open until a record does not fit, idle_seal_seconds or close: with fewer
writing partitions than open slots, the dead records of finished partitions' blocks stayed (issue 16,
H65: SWE-shaped full mode ended with 64 of 71 blocks open, their dead records 0.86 of the live bytes)."""

from __future__ import annotations

from pathlib import Path

from compaction_helpers import MIB, rebuild_violations

import blockstore
from blockstore.compaction import attach
from blockstore.directory import BLOCK_OPEN

GC = {"policy": "no-relocation", "gc_budget": 1e9}
VAL = 50_000


def _fill(s: blockstore.Store) -> tuple[int, dict[bytes, bytes]]:
    """Partition p writes 10 records, then q overwrites 6 of them: p's open block is 60 % dead."""
    model = {b"k%d" % i: bytes([i]) * VAL for i in range(10)}
    s.put_many(list(model.items()), partition="p")
    for i in range(6):
        model[b"k%d" % i] = bytes([100 + i]) * VAL
        s.put_many([(b"k%d" % i, model[b"k%d" % i])], partition="q")
    loc = s.locate_many([b"k9"])[0]
    assert loc is not None
    return loc.block_id, model


def _state(s: blockstore.Store, bid: int) -> int | None:
    return next((e.state for e in s.block_table() if e.block_id == bid), None)


def test_an_idle_open_block_past_the_ratio_is_sealed_and_collected(tmp_path: Path) -> None:
    with blockstore.open(tmp_path, block_size=MIB, idle_seal_seconds=0) as s:
        p_block, model = _fill(s)
        c = attach(s, GC, background=False)
        c.run_pass()  # the first pass sets the mark: nothing is idle "since the previous pass" yet
        assert _state(s, p_block) == BLOCK_OPEN
        rep = c.run_pass()
        assert _state(s, p_block) is None  # sealed, its 4 live records copied out, reclaimed
        assert rep.gc_records == 4 and rep.reclaimed_blocks == 1
        assert {k: bytes(v) for k, v in zip(model, s.get_many(list(model))) if v is not None} == model
        assert rebuild_violations(s) == []
        c.stop()
    with blockstore.open(tmp_path, block_size=MIB) as s:
        assert {k: s.get(k) for k in model} == model


def test_an_open_block_still_written_to_is_left_to_fill(tmp_path: Path) -> None:
    with blockstore.open(tmp_path, block_size=MIB, idle_seal_seconds=0) as s:
        p_block, _model = _fill(s)
        c = attach(s, GC, background=False)
        c.run_pass()
        s.put_many([(b"more", b"m" * 1000)], partition="p")  # p writes again before the next pass
        c.run_pass()
        assert _state(s, p_block) == BLOCK_OPEN
        c.stop()


def test_an_open_block_of_tombstones_only_stays_open(tmp_path: Path) -> None:
    """Sealed, it would be a block GC may not take while its tombstones are needed, and the next
    delete would open another: one per pass."""
    with blockstore.open(tmp_path, block_size=MIB, idle_seal_seconds=0) as s:
        s.put_many([(b"a", b"x" * VAL), (b"b", b"y" * VAL)], partition="p")
        s.delete_many([b"a"])
        c = attach(s, GC, background=False)
        c.run_pass()
        c.run_pass()
        stones = [e for e in s.block_table() if e.tombstones and e.total_records == e.tombstones]
        assert len(stones) == 1 and stones[0].state == BLOCK_OPEN
        c.stop()


def test_writers_racing_the_background_seals_lose_nothing(tmp_path: Path) -> None:
    """Writers whose partitions finish every few writes (so their blocks go idle, and are sealed and
    collected by the background compactor while other writers put, overwrite, delete and read): every
    read sees the last write, the blocks rebuild to the directory, and a reopen reads the same."""
    import random
    import threading

    s = blockstore.open(tmp_path, block_size=256 << 10, idle_seal_seconds=0,
                        compaction={"policy": "full", "interval_s": 0.005, "gc_budget": 1e9})
    models: list[dict[bytes, bytes]] = [{} for _ in range(3)]
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        rng, model = random.Random(t), models[t]
        try:
            for i in range(400):
                r = rng.random()
                if r < 0.6:
                    k = b"t%d/k%d" % (t, rng.randrange(100))
                    model[k] = rng.randbytes(rng.randint(100, 20_000))
                    s.put_many([(k, model[k])], partition=f"w{t}/p{i // 12}")
                elif r < 0.8 and model:
                    k = rng.choice(sorted(model))
                    s.delete_many([k])
                    del model[k]
                elif model:
                    ks = sorted(model)[:8]
                    assert [None if v is None else bytes(v) for v in s.get_many(ks)] == [model[k] for k in ks]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert errors == []
        model = {k: v for m in models for k, v in m.items()}
        keys = [b"t%d/k%d" % (t, i) for t in range(3) for i in range(100)]
        assert [None if v is None else bytes(v) for v in s.get_many(keys)] == [model.get(k) for k in keys]
        # The rebuild check lists block files, then reads them: a pass still running (every 5 ms) deletes
        # blocks between the two (NotFound, about 1 run in 6 under load), so the compactor stops first.
        s.compactor.stop()
        assert rebuild_violations(s) == []
    finally:
        s.close()
    with blockstore.open(tmp_path) as s2:
        assert {k: s2.get(k) for k in keys} == {k: model.get(k) for k in keys}
