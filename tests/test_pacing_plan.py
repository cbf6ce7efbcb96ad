"""A background (paced) pass plans relocation at most once per PLAN_SPACING x its last planning's duration
(capped at PLAN_WAIT_MAX_S): planning is Python under the GIL, and a foreground that never pauses made
every group due again each 10 ms pass. A caller's unpaced pass always plans."""

from __future__ import annotations

import os
import time
from pathlib import Path

import blockstore
from blockstore.compaction.compactor import PLAN_WAIT_MAX_S


def _store_with_due_groups(path: Path) -> blockstore.Store:
    s = blockstore.open(str(path), block_size=1 << 20, compaction={"policy": "full", "background": False})
    for i in range(40):  # one record per put: pairs that are read together sit apart
        s.put_many([(b"k%02d" % i, os.urandom(2048))])
    for _ in range(6):
        for i in range(0, 40, 8):
            s.get_many([b"k%02d" % i, b"k%02d" % (i + 5), b"k%02d" % (i + 7)])
    return s


def test_a_paced_pass_waits_its_spacing_before_planning_again(tmp_path: Path) -> None:
    s = _store_with_due_groups(tmp_path / "s")
    try:
        comp = s.compactor
        calls: list[int] = []
        real = comp.tracker.ranked
        comp.tracker.ranked = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[method-assign]
        before = time.monotonic()
        comp.run_pass(pace=True)
        assert calls == [1]
        assert before < comp._plan_after <= time.monotonic() + PLAN_WAIT_MAX_S  # spaced, and capped
        comp._plan_after = time.monotonic() + 60  # as if the last plan had been slow
        comp.run_pass(pace=True)
        assert calls == [1]  # no second plan within the spacing
        comp.run_pass()  # a caller's pass (the CLI's compact, run_until_idle) is not spaced
        assert calls == [1, 1]
        comp._plan_after = 0.0
        comp.run_pass(pace=True)
        assert calls == [1, 1, 1]
    finally:
        s.close()
