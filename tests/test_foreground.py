"""Foreground first (issue 16, blockstore/foreground.py): reads in flight are counted, and a thread marked
background pauses at its checkpoints while one is, within a starvation bound; a caller's pass and the
store's other threads never pause. Durations are bounded loosely (a loaded machine only makes waits
longer than asked, never shorter)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import blockstore
from blockstore import foreground


@pytest.fixture(autouse=True)
def _no_reads_left() -> Any:
    foreground.READS.clear()
    yield
    foreground.READS.clear()
    foreground.foreground()


def _in_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_reads_and_lookups_are_counted_while_they_run(tmp_path: Path) -> None:
    with blockstore.open(str(tmp_path / "s")) as s:
        s.put_many([(b"a", b"1" * 100), (b"b", b"2" * 100)])
        seen: list[int] = []
        s.add_read_observer(lambda _sfx, _locs: seen.append(len(foreground.READS)))
        s.get_many([b"a", b"b"])
        s.get(b"a")
        s.read_located([b"b"], s.locate_many([b"b"]))
        assert seen == [1, 1, 1] and not foreground.READS
        inner = s.dir.get_locations
        s.dir.get_locations = lambda keys: (seen.append(len(foreground.READS)), inner(keys))[1]  # type: ignore[method-assign]
        s.locate_many([b"a"])
        assert seen[-1] == 1 and not foreground.READS
        with pytest.raises(blockstore.InvalidArgument):  # a read that fails is counted out too
            s.get_many([b"a"], out=[bytearray(1), bytearray(1)])
        assert not foreground.READS
        # compaction's own reads are not foreground reads
        s.dir.get_locations = inner  # type: ignore[method-assign]
        s.read_locations([loc for loc in s.locate_many([b"a"]) if loc is not None])
        assert seen[-1] == 1 and not foreground.READS


def test_only_a_background_thread_pauses() -> None:
    foreground.READS.append(None)
    waits = foreground.STATS.waits
    foreground.step_aside()  # this thread is not background
    assert _in_thread(lambda: (foreground.step_aside(), foreground.STATS.waits)[1]) == waits
    assert foreground.STATS.waits == waits  # every pause is counted: none happened


def test_a_background_thread_pauses_up_to_the_bound_then_runs_its_grant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foreground, "GRANT_S", 30.0)  # long enough that no machine's delay ends it here
    foreground.READS.append(None)  # a read that never ends

    def body() -> tuple[float, int, int]:
        foreground.background()
        grants, waits = foreground.STATS.grants, foreground.STATS.waits
        t0 = time.perf_counter()
        foreground.step_aside()
        paused = time.perf_counter() - t0
        foreground.step_aside()  # within its grant: no pause
        foreground.foreground()
        return paused, foreground.STATS.grants - grants, foreground.STATS.waits - waits

    paused, grants, waits = _in_thread(body)
    assert paused >= foreground.MAX_WAIT_S and grants == 1 and waits == 1


def test_the_pause_ends_when_the_read_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foreground, "MAX_WAIT_S", 5.0)
    foreground.READS.append(None)

    def body() -> float:
        foreground.background()
        t0 = time.perf_counter()
        threading.Timer(0.05, foreground.READS.pop).start()  # the read ends 50 ms from now
        foreground.step_aside()
        return time.perf_counter() - t0

    assert 0.04 <= _in_thread(body) < 2.0


def test_no_pause_while_a_write_waits_for_the_slot_it_leads_or_once_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foreground, "MAX_WAIT_S", 5.0)
    foreground.READS.append(None)
    stop = threading.Event()

    def body() -> tuple[float, float]:
        foreground.background(stop)
        foreground.leading(lambda: True)
        t0 = time.perf_counter()
        foreground.step_aside()
        foreground.leading(None)
        stop.set()
        t1 = time.perf_counter()
        foreground.step_aside()
        return t1 - t0, time.perf_counter() - t1

    assert max(_in_thread(body)) < 1.0


def _garbage(s: blockstore.Store) -> None:
    """Sealed blocks mostly dead: work for GC."""
    for _ in range(3):
        s.put_many([(b"k%03d" % i, os.urandom(8192)) for i in range(64)])
    s.delete_many([b"k%03d" % i for i in range(48)])


def test_background_compaction_steps_aside_yet_finishes_under_a_read_that_never_ends(tmp_path: Path) -> None:
    with blockstore.open(str(tmp_path / "s"), block_size=1 << 18,
                         compaction={"policy": "full", "interval_s": 0.01}) as s:
        _garbage(s)
        waits = foreground.STATS.waits
        foreground.READS.append(None)
        c = s.compactor
        assert c is not None
        deadline = time.monotonic() + 60
        while c.totals.gc_blocks == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.totals.gc_blocks > 0  # the starvation bound let it work
        assert foreground.STATS.waits > waits  # and it paused for the read
        assert {k: s.get(k) is not None for k in (b"k000", b"k047", b"k048", b"k063")} == \
            {b"k000": False, b"k047": False, b"k048": True, b"k063": True}


def test_a_callers_pass_never_pauses(tmp_path: Path) -> None:
    with blockstore.open(str(tmp_path / "s"), block_size=1 << 18,
                         compaction={"policy": "full", "background": False}) as s:
        _garbage(s)
        foreground.READS.append(None)
        waits = foreground.STATS.waits
        c = s.compactor
        assert c is not None
        rep = c.run_pass(pace=True)  # paced, but on the caller's thread
        rep2 = c.run_until_idle()
        assert rep.gc_blocks + rep2.gc_blocks > 0 and foreground.STATS.waits == waits
        assert not foreground.is_background()


def test_the_leader_slot_says_when_a_write_or_an_exclusive_caller_waits() -> None:
    from blockstore.leader import LeaderSlot

    slot = LeaderSlot()
    leading, release = threading.Event(), threading.Event()

    def apply(_muts: Any) -> None:
        leading.set()
        release.wait(5)

    def exclusive() -> None:
        with slot.exclusive():
            pass

    def until_waiting() -> bool:
        deadline = time.monotonic() + 5
        while not slot.waiting() and time.monotonic() < deadline:
            time.sleep(0.001)
        return slot.waiting()

    for other in (exclusive, lambda: slot.submit([], lambda _m: None, lambda: None)):
        leading.clear()
        release.clear()
        first = threading.Thread(target=slot.submit, args=([], apply, lambda: None))
        first.start()
        assert leading.wait(5) and not slot.waiting()  # leading, nobody waiting: a background leader may pause
        second = threading.Thread(target=other)
        second.start()
        assert until_waiting()
        release.set()
        first.join()
        second.join()
        assert not slot.waiting()


def test_stepping_yields_every_item_with_a_checkpoint_every_so_many(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foreground, "MAX_WAIT_S", 0.0)  # each checkpoint a pause of no length (counted)
    monkeypatch.setattr(foreground, "GRANT_S", 0.0)
    foreground.READS.append(None)

    def body() -> tuple[list[int], int]:
        foreground.background()
        waits = foreground.STATS.waits
        out = list(foreground.stepping(range(130), every=64))
        return out, foreground.STATS.waits - waits

    assert _in_thread(body) == (list(range(130)), 3)  # before items 0, 64 and 128


def test_a_block_entry_copy_is_equal_and_independent() -> None:
    from blockstore.directory_values import BlockEntry

    e = BlockEntry(5, 2, b"part", 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, b"remote")
    c = e.copy()
    assert c == e and c is not e
    c.live_bytes -= 1
    assert e.live_bytes == 12


def test_a_background_leader_never_pauses_while_it_applies_another_callers_write() -> None:
    """The group a leader applies holds every group queued when it took the slot: a caller's write in it
    waits for that group as much as one queued behind it, so the leader does not pause for reads then."""
    from blockstore.leader import LeaderSlot

    slot = LeaderSlot()
    with slot._cv:
        slot._leader = True  # another leader is applying: the caller's write queues behind it
    caller = threading.Thread(target=slot.submit, args=([b"caller"], lambda _m: None, lambda: None))
    caller.start()
    deadline = time.monotonic() + 5
    while not slot.waiting() and time.monotonic() < deadline:
        time.sleep(0.001)
    with slot._cv:
        slot._leader = False  # that leader is done; the background thread comes first and leads both groups

    def background_leads() -> tuple[list[Any], bool]:
        foreground.background()
        seen: list[tuple[list[Any], bool]] = []
        busy = foreground._Background.busy  # the class default: no group led

        def apply(muts: list[Any]) -> None:
            b = foreground._bg.busy
            seen.append((muts, b is not None and b()))

        slot.submit([b"background"], apply, lambda: None)
        foreground.foreground()
        assert foreground._bg.busy is busy
        return seen[0]

    muts, busy = _in_thread(background_leads)
    caller.join(5)
    assert sorted(muts) == [b"background", b"caller"]  # the caller's write is in the group it leads
    assert busy  # so its checkpoints do not pause for reads


def test_a_blend_counts_as_a_read_in_flight_while_it_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The blend's loads are C calls outside Reader.read (layer_loader.py), which counts only its own
    reads: before, background compaction never stepped aside for a blend (H74 left it)."""
    torch = pytest.importorskip("torch")
    from blockstore.blend import Blender, ChunkKVStore, LlamaConfig, LlamaWeights

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    w = LlamaWeights.random(cfg, seed=1, std=0.2)
    with blockstore.open(tmp_path / "s") as s:
        blender = Blender(w, ChunkKVStore(s, model_id=Blender.kv_model_id(w)), ratio=0.3)
        prompt = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(0))
        seen: list[int] = []
        real = blender._run_layers

        def watching(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(len(foreground.READS))
            return real(*args, **kwargs)

        blender._run_layers = watching  # type: ignore[method-assign]
        before = len(foreground.READS)
        blender.blend(prompt, spans=[(0, 16), (16, 32)])  # stores both chunks
        blender.blend(prompt, spans=[(0, 16), (16, 32)])  # reads them
        assert seen == [before + 1, before + 1] and len(foreground.READS) == before

        def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise RuntimeError("a failed blend")

        blender._run_layers = failing  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            blender.blend(prompt, spans=[(0, 16), (16, 32)])
        assert len(foreground.READS) == before  # a failed blend leaves no count behind
