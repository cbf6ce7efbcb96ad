"""The uploader ledger's mark numbers (blockstore/remote/ledger.py: `uploaded_since`) and remote GC's use of
them (reclaim.py reads the whole ledger once, then only the marks made since): no cluster, an in-memory
object store."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

import blockstore
from blockstore.remote import Uploader
from blockstore.remote.ledger import Ledger
from blockstore.remote.reclaim import Reclaimer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_remote_tier_memory import MemoryObjects  # noqa: E402


def mark(ledger: Ledger, block_id: int) -> None:
    ledger.mark_uploaded(block_id, {"data_key": f"blocks/n/{block_id:016x}-0", "index_key": f"i{block_id}"})


def test_marks_are_numbered_in_the_order_made_not_by_block_id(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "ledger"))
    assert ledger.next_mark() == 0 and ledger.uploaded_since(0) == ({}, 0)
    for b in (7, 3, 9):  # blocks of different partitions seal, and upload, out of id order
        mark(ledger, b)
    got, nxt = ledger.uploaded_since(0)
    assert sorted(got) == [3, 7, 9] and nxt == 3 and got[3]["index_key"] == "i3"
    mark(ledger, 3)  # marked again: not a new mark
    mark(ledger, 1)  # below every id seen so far: still found
    got, nxt = ledger.uploaded_since(nxt)
    assert list(got) == [1] and nxt == 4
    assert ledger.uploaded_since(nxt) == ({}, 4)
    ledger.close()
    ledger = Ledger(str(tmp_path / "ledger"))  # numbers continue after a reopen
    assert ledger.next_mark() == 4
    mark(ledger, 2)
    assert ledger.uploaded_since(4) == ({2: ledger.uploaded(2)}, 5)
    # marks from several threads: each gets its own number, a reader between them misses none
    seen: dict[int, dict[str, object]] = {}
    at = [5]

    def read() -> None:
        got, at[0] = ledger.uploaded_since(at[0])
        seen.update(got)

    threads = [threading.Thread(target=lambda t=t: [mark(ledger, 100 + t * 50 + i) for i in range(50)])
               for t in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        read()
    read()
    assert sorted(seen) == list(range(100, 300)) and at[0] == 205 and ledger.uploaded_count() == 205
    ledger.close()


def test_remote_gc_reads_only_new_marks_after_its_first_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = MemoryObjects()
    with blockstore.open(tmp_path / "s", block_size=64 << 10) as s:
        up = Uploader(s, objects, "node-m")  # type: ignore[arg-type]
        rec = Reclaimer(up, grace_s=200.0, max_poll_interval_s=1.0)
        s.put_many([(b"a", b"x" * 10_000), (b"b", b"y" * 10_000)])
        s.seal_open_blocks()
        assert up.run_once().pending_blocks == []
        assert rec.run_once().published == []  # the first pass reads the whole ledger
        s.put_many([(b"c", b"z" * 10_000), (b"d", b"w" * 10_000)])
        s.seal_open_blocks()
        later = max(e.block_id for e in s.block_table())
        assert up.run_once().pending_blocks == []  # a block the first pass never saw
        s.put_many([(b"c", b"new"), (b"d", b"new")])  # empties it: the engine deletes it
        s.seal_open_blocks()
        assert up.run_once().pending_blocks == [] and not s.has_block(later)

        def whole_ledger() -> None:
            raise AssertionError("a later pass read the whole ledger")

        monkeypatch.setattr(up.ledger, "uploaded_blocks", whole_ledger)
        st = rec.run_once()
        assert st.published == [later] and st.last_error is None  # found through the new marks only
        rec.close()
        up.close()
