"""Review of session 27 (H58): checks that the tests landed this session can fail.

- The power-loss loop's mode 'mixed' (tests/power_loss.py) judges each value by the mode of the session that
  acknowledged it (`Op.synced`). The loop's own tests only show that an honest store passes; nothing showed that
  the model still sees a loss. Here: the model's rule, case by case, and the loop run against a store whose sync
  sessions do not sync (each 'sync' open of the workload opens in cache mode), which must be caught as 'lost'.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from power_loss import Journal, Op, Workload, run_loop, work_dir  # noqa: E402

import blockstore  # noqa: E402

K = ("kv", "k0")


def _journal(*ops: tuple[Any, int, int | None, bool], closes: tuple[int, ...] = ()) -> Journal:
    """ops: (value, intent, ack, synced)."""
    j = Journal(closes=list(closes))
    for v, intent, ack, synced in ops:
        j.ops.setdefault(K, []).append(Op(K, v, intent, ack, synced))
    return j


def test_a_value_a_sync_session_acknowledged_is_durable_from_its_ack() -> None:
    j = _journal((b"v1", 1, 5, True), (b"v2", 6, 9, True))
    assert j.allowed(K, 10) == {b"v2"}
    assert j.allowed(K, 8) == {b"v1", b"v2"}  # v2 in flight at the cut


def test_a_value_a_cache_session_acknowledged_is_not_durable_before_a_clean_close() -> None:
    # v1 acknowledged by a sync session, then v2 by a cache session (a clean close between them, at 7)
    j = _journal((b"v1", 1, 5, True), (b"v2", 8, 9, False), closes=(7,))
    assert j.allowed(K, 12) == {b"v1", b"v2"}  # v2 may be lost: its session never closed
    j.closes.append(11)
    assert j.allowed(K, 12) == {b"v2"}  # the close made it durable


def test_an_operation_that_raised_is_never_durable() -> None:
    # even marked synced: without an acknowledgement it is at most one of the values a cut may find
    j = _journal((b"v1", 1, 5, True), (b"v2", 6, None, True))
    assert j.allowed(K, 20) == {b"v1", b"v2"}


class _Seam:
    def __init__(self) -> None:
        self.n = 0

    def image_op_count(self) -> int:
        self.n += 3
        return self.n


def test_an_operation_that_raised_in_a_sync_session_is_not_marked_synced() -> None:
    w = Workload(_Seam(), Path("unused"), "mixed", random.Random(1))  # type: ignore[arg-type]
    w.store, w.session_mode = object(), "sync"  # type: ignore[assignment]

    def fails(_s: Any) -> None:
        raise OSError("the call failed")

    with pytest.raises(OSError):
        w._op([(K, b"v1")], fails)
    (op,) = w.journal.ops[K]
    assert op.ack is None and not op.synced
    w._op([(K, b"v2")], lambda _s: None)
    assert w.journal.ops[K][1].synced


def _mixed_failures(monkeypatch: pytest.MonkeyPatch, lie: bool) -> list[str]:
    real_open = blockstore.open

    def sync_that_does_not_sync(path: Any, **kw: Any) -> blockstore.Store:
        # only the workload's opens (they pass max_open_blocks and no create; the checks' reopens pass create=False)
        if lie and "create" not in kw and "max_open_blocks" in kw and kw.get("durability") == "sync":
            kw["durability"] = "cache"
        return real_open(path, **kw)

    monkeypatch.setattr(blockstore, "open", sync_that_does_not_sync)
    with tempfile.TemporaryDirectory(prefix="power-loss-", dir=work_dir()) as tmp:
        stats = run_loop(2, ["mixed"], 2, Path(tmp))
    return [v for f in stats.failures for v in f.violations]


def test_mixed_mode_catches_sync_sessions_that_do_not_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    # the same runs (seed 2, 2 runs: 8 of 50 cuts lose a value) pass on the honest store
    assert _mixed_failures(monkeypatch, lie=False) == []
    found = _mixed_failures(monkeypatch, lie=True)
    assert any(v.startswith("lost") for v in found), found
