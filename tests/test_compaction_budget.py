"""Compaction writes only what it must: a pass that does nothing writes nothing to the directory
(issue 17), and relocation's budget refills with reads as well as writes, across a reopen (issue 16:
a spent budget, persisted, left a reopened read-mostly store relocating nothing ever again)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from compaction_helpers import MIB

import blockstore
from blockstore.compaction import Compactor


def _count_directory_writes(s: blockstore.Store, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    real = s.dir.write

    def write(batch: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(batch)
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(s.dir, "write", write)
    return calls


def test_a_compaction_that_does_nothing_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with blockstore.open(tmp_path, block_size=MIB, compaction={"policy": "aggressive", "background": False}) as s:
        keys = [b"k%d" % i for i in range(40)]
        s.put_many([(k, b"x" * 3000) for k in keys])
        for k in keys[::2]:
            s.put(k, b"y" * 3000, partition="later")
        s.get_many(keys[:10])
        s.get_many(keys[:10])
        c = s.compactor
        assert isinstance(c, Compactor)
        c.run_until_idle()  # learns, copies, flushes what it learned and did
        calls = _count_directory_writes(s, monkeypatch)
        rep = c.run_until_idle()
        assert not rep.did_work
        c.flush()
        assert calls == [], f"{len(calls)} directory write(s) by a compaction that did nothing"
        s.get_many(keys[:10])  # something new learned: the next flush writes it
        c.flush()
        assert calls  # the group and the read-bytes counter


def test_relocation_budget_refills_with_reads_and_survives_a_reopen(tmp_path: Path) -> None:
    spec = {"policy": "full", "background": False}
    with blockstore.open(tmp_path, block_size=MIB, compaction=spec) as s:
        s.put_many([(b"a%d" % i, b"x" * 10_000) for i in range(10)])
        c = s.compactor
        assert isinstance(c, Compactor)
        fraction, per_read = c.policy.relocation_budget, c.policy.relocation_read_budget
        assert per_read > 0
        before = c.budget_left(0, fraction, reads=True)
        assert before == pytest.approx(fraction * s.io_counters()[0])
        s.get_many([b"a%d" % i for i in range(10)])
        read = sum(loc.record_len for loc in s.locate_many([b"a%d" % i for i in range(10)]) if loc is not None)
        assert c.budget_left(0, fraction, reads=True) == pytest.approx(before + per_read * read)
        assert c.budget_left(0, fraction) == pytest.approx(before)  # GC's budget: writes only
    with blockstore.open(tmp_path, compaction=spec) as s:
        c = s.compactor
        assert isinstance(c, Compactor)
        assert c.read_bytes == read  # persisted with the other counters
        s.get_many([b"a%d" % i for i in range(5)])
        assert c.read_bytes > read  # a reopened store earns moves again as it is read
