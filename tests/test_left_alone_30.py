"""Defects earlier reviews found and left alone (session 30, H69). Each test failed on the HEAD before its fix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blockstore
from blockstore import directory
from blockstore.errors import StoreClosed


def _store(path: Path, n: int = 10, **kw: Any) -> blockstore.Store:
    s = blockstore.open(path, **kw)
    s.put_many([(b"k%04d" % i, b"v%d" % i) for i in range(n)])
    return s


# ---- 1. a paused listing holds no RocksDB iterator ----

@pytest.mark.parametrize("listing", ["iter_keys", "iter_locations", "block_records"])
def test_paused_listing_raises_store_closed_and_the_store_reopens(tmp_path: Path, listing: str) -> None:
    """A listing paused across close(): it kept RocksDB's handle alive, went on returning keys after close,
    and RocksDB's LOCK stayed held, so the reopen in the same process failed ("lock hold by current
    process")."""
    s = _store(tmp_path / "s", durability="sync")
    its: dict[str, Iterator[Any]] = {
        "iter_keys": s.iter_keys(),
        "iter_locations": s.iter_locations(),
        "block_records": s.dir.block_records(s.locate_many([b"k0000"])[0].block_id),  # type: ignore[union-attr]
    }
    it = its.pop(listing)
    for other in its.values():
        other.close()  # type: ignore[attr-defined]  # generators
    next(it)
    s.close()
    with pytest.raises(StoreClosed):
        next(it)
    with blockstore.open(tmp_path / "s") as s2:  # no "lock hold by current process"
        assert s2.get(b"k0009") == b"v9"


def test_paused_listing_started_before_close_raises_store_closed_at_its_first_next(tmp_path: Path) -> None:
    s = _store(tmp_path / "s")
    it = s.iter_keys()  # not started: its first next() runs after close
    s.close()
    with pytest.raises(StoreClosed):
        next(it)
    blockstore.open(tmp_path / "s").close()


def test_close_does_not_wait_for_a_paused_listing(tmp_path: Path) -> None:
    import time

    s = _store(tmp_path / "s", n=2000)
    it = s.iter_locations()
    next(it)
    t0 = time.monotonic()
    s.close()
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(StoreClosed):
        list(it)


@pytest.mark.parametrize("batch", [1, 2, 3, 256])
def test_batched_scans_return_every_key_once_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      batch: int) -> None:
    """Batches resume just after the last key read: keys that differ only by trailing NUL bytes, prefixes of
    each other and a prefix scan that ends inside a batch are each seen once, in byte order."""
    monkeypatch.setattr(directory, "SCAN_BATCH", batch)
    keys = sorted({b"a", b"a\x00", b"a\x00\x00", b"a\x01", b"ab", b"b", b"b\xff", b"b\xff\xff", b"c"}
                  | {b"m%03d" % i for i in range(40)})
    with blockstore.open(tmp_path / "s") as s:
        s.put_many([(k, k) for k in keys])
        s.put(b"other-ns", b"x", ns="zz")
        assert list(s.iter_keys()) == keys
        assert list(s.iter_keys(prefix=b"a")) == [k for k in keys if k.startswith(b"a")]
        assert list(s.iter_keys(prefix=b"b\xff")) == [b"b\xff", b"b\xff\xff"]
        assert [k for k, _loc in s.iter_locations(after=b"a\x00")] == keys[2:]
        assert list(s.iter_keys(ns="zz")) == [b"other-ns"]


def test_paused_listing_goes_on_over_writes_made_while_paused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not one point-in-time view any more (scan_prefix says so): every key present for the whole scan is
    seen once, in order; a key deleted ahead of the position is not returned."""
    monkeypatch.setattr(directory, "SCAN_BATCH", 4)
    with _store(tmp_path / "s", n=20) as s:
        it = s.iter_keys()
        got = [next(it) for _ in range(6)]
        s.delete(b"k0010")
        s.put(b"k0015x", b"new")
        got += list(it)
        assert got == sorted(set(got))
        assert set(got) >= {b"k%04d" % i for i in range(20) if i != 10}
        assert b"k0010" not in got


# ---- 2. a call racing close() ----

def _race_close_once(path: Path, r: int, wrong: list[BaseException]) -> None:
    import threading
    import time

    s = _store(path, n=300)
    go = threading.Event()

    def loop(call: str) -> None:
        go.wait()
        try:
            while True:
                if call == "get":
                    s.get_many([b"k%04d" % i for i in range(0, 300, 7)])
                elif call == "put":
                    s.put(b"p%d" % r, b"x" * 100)
                elif call == "locate":
                    s.locate_many([b"k%04d" % i for i in range(0, 300, 3)])
                else:
                    for _k in s.iter_keys():
                        pass
        except StoreClosed:
            return
        except BaseException as exc:  # noqa: BLE001  (what the test looks for)
            wrong.append(exc)

    threads = [threading.Thread(target=loop, args=(c,)) for c in ("get", "put", "locate", "iter", "get", "iter")]
    for t in threads:
        t.start()
    go.set()
    time.sleep(0.02)
    s.close()
    for t in threads:
        t.join(10)


def _race_close(path: Path, rounds: int) -> list[BaseException]:
    """Threads getting, putting, locating and listing while the main thread closes the store; what they raised
    other than StoreClosed."""
    wrong: list[BaseException] = []
    for r in range(rounds):
        _race_close_once(path, r, wrong)
    return wrong


def test_calls_racing_close_raise_store_closed(tmp_path: Path) -> None:
    """Threads getting, putting, locating and listing while the store closes: StoreClosed or an answer."""
    wrong = _race_close(tmp_path / "s", rounds=10)
    assert not wrong, [f"{type(e).__name__}: {e}" for e in wrong[:5]]


class _HandleRacingClose:
    """Stands in for the store's RocksDB handle: the reader thread's call waits until close() has the handle,
    then meets what rocksdict answers then ("Already mutably borrowed" while close holds it, DbClosedError
    once it is closed). The race is a matter of microseconds (seen once by H64): this makes it happen."""

    def __init__(self, db: Any, reader: Any, when: str) -> None:
        import threading

        self.db, self.reader, self.when = db, reader, when
        self.closing, self.answered = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def get(self, *args: Any) -> Any:
        import threading

        if threading.current_thread() is not self.reader[0]:
            return self.db.get(*args)
        assert self.closing.wait(10)
        try:
            if self.when == "during":
                raise RuntimeError("Already mutably borrowed")  # rocksdict's PyCell, close() holding it
            return self.db.get(*args)  # closed by now: DbClosedError
        finally:
            self.answered.set()

    def close(self) -> None:
        if self.when == "during":
            self.closing.set()
            assert self.answered.wait(10)
            self.db.close()
        else:
            self.db.close()
            self.closing.set()


@pytest.mark.parametrize("when", ["during", "after"])
def test_a_read_racing_the_directory_close_raises_store_closed(tmp_path: Path, when: str) -> None:
    """It raised IOErrorBS(EIO) "directory read: Already mutably borrowed" (or "DB instance already closed"): an
    I/O error of an open store, to a caller whose store was simply closed under it."""
    import threading

    s = _store(tmp_path / "s")
    reader: list[Any] = [None]
    handle = _HandleRacingClose(s.dir._db, reader, when)
    s.dir._db = handle
    got: list[Any] = []

    def read() -> None:
        try:
            got.append(s.get(b"k0001"))
        except BaseException as exc:  # noqa: BLE001  (what the test looks at)
            got.append(exc)

    reader[0] = t = threading.Thread(target=read)
    t.start()
    s.close()
    t.join(10)
    assert len(got) == 1 and isinstance(got[0], StoreClosed), got
    blockstore.open(tmp_path / "s").close()


def test_the_same_rocksdict_error_on_an_open_store_is_not_taken_for_a_close(tmp_path: Path) -> None:
    from blockstore.errors import IOErrorBS

    class Refusing:
        def __init__(self, db: Any) -> None:
            self.db = db

        def __getattr__(self, name: str) -> Any:
            return getattr(self.db, name)

        def get(self, *args: Any) -> Any:
            raise RuntimeError("Already mutably borrowed")

    with _store(tmp_path / "s") as s:
        real = s.dir._db
        s.dir._db = Refusing(real)
        with pytest.raises(IOErrorBS, match="mutably borrowed"):
            s.get(b"k0001")
        s.dir._db = real


# ---- 3. the remote tier's RocksDBs sync with the GIL released ----

class _WriteSpy:
    """A RocksDB handle that notes each write (with its sync flag) and each WAL flush."""

    def __init__(self, db: Any) -> None:
        self.db, self.calls = db, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def write(self, batch: Any, opts: Any = None) -> None:
        self.calls.append(("write", bool(opts is not None and opts.sync)))
        self.db.write(batch, *(() if opts is None else (opts,)))

    def put(self, key: Any, value: Any, opts: Any = None) -> None:
        self.calls.append(("write", bool(opts is not None and opts.sync)))
        self.db.put(key, value, *(() if opts is None else (opts,)))

    def flush_wal(self, sync: bool = False) -> None:
        self.calls.append(("flush_wal", sync))
        self.db.flush_wal(sync)


def _assert_synced_without_the_gil(calls: list[tuple[str, bool]], writes: int) -> None:
    """rocksdict holds the GIL through a write with WriteOptions.sync; flush_wal(True) releases it."""
    assert calls == [("write", False), ("flush_wal", True)] * writes, calls


def test_remote_tier_databases_sync_by_flush_wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """remote/ledger.py, reclaim.py and pool.py wrote with WriteOptions.sync: each durable write of theirs
    stopped every thread of the process (the store's readers too) for the disk's sync latency."""
    from rocksdict import Rdict

    from blockstore.remote import reclaim
    from blockstore.remote.layout import Superseded
    from blockstore.remote.ledger import Ledger
    from blockstore.remote.pool import RemotePool

    ledger = Ledger(str(tmp_path / "ledger"))
    ledger._db = spy = _WriteSpy(ledger._db)
    ledger.set_cursor(7)
    ledger.reserve_many({8: 1, 9: 2}, 3)
    _assert_synced_without_the_gil(spy.calls, 2)
    assert ledger.cursor == 7 and ledger.reservation(9) == {"seq": 2} and ledger.next_seq() == 3
    ledger.close()

    rec = object.__new__(reclaim.Reclaimer)  # its durable list alone (the rest needs an uploader and a bucket)
    rec._db = spy = _WriteSpy(Rdict(str(tmp_path / "reclaim")))
    rec._write({b"a": 1}, (b"b",))
    _assert_synced_without_the_gil(spy.calls, 1)
    assert rec._get(b"a") == 1
    rec.close()

    spies: list[_WriteSpy] = []

    def spied(*args: Any, **kwargs: Any) -> _WriteSpy:
        spies.append(_WriteSpy(Rdict(*args, **kwargs)))
        return spies[-1]

    monkeypatch.setattr(reclaim, "Rdict", spied)
    marker = Superseded(node="n", block_id=5, data_key="d", index_key="i", after_index="", keys=[])
    assert reclaim.adopt_published(str(tmp_path), {"gc/n/1-5": marker}, path=str(tmp_path / "adopted")) == 1
    _assert_synced_without_the_gil(spies[0].calls, 1)

    pool = RemotePool(None, str(tmp_path / "pool"))  # type: ignore[arg-type]  # no object is read here
    pool._db = spy = _WriteSpy(pool._db)
    pool._ingest([])
    pool._apply("n", "gc/n/1-5", marker)
    _assert_synced_without_the_gil(spy.calls, 2)
    pool.close()


# ---- 4. sync_moves keeps its sources pending when its synced write fails ----

def test_sync_moves_after_a_failed_write_still_reclaims_the_emptied_source(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """sync_moves emptied its pending set before its synced write: after that write failed, the next
    sync_moves found nothing to do and the moved-out block stayed on disk until close (H67)."""
    import errno

    from blockstore.errors import IOErrorBS
    from blockstore.keys import SPACE_KV, key_suffix

    with blockstore.open(tmp_path, block_size=1 << 20, durability="cache") as s:
        s.put(b"k", b"v" * 5000)
        s.put(b"other", b"o", partition="elsewhere")
        nid = s.namespace_id("default")
        assert nid is not None
        sfx = key_suffix(nid, SPACE_KV, b"k")
    with blockstore.open(tmp_path, block_size=1 << 20, durability="cache") as s:  # k's block is sealed now
        loc = s.dir.get_locations([sfx])[0]
        assert loc is not None
        assert s.relocate_many([(sfx, loc, s.read_locations([loc])[0])], partition=b"\0compaction/gc") == [True]
        real = s.dir.write

        def failing(batch: Any, *, force_sync: bool = False) -> None:
            raise IOErrorBS(errno.EIO, "directory write failed (injected)")

        monkeypatch.setattr(s.dir, "write", failing)
        with pytest.raises(IOErrorBS):
            s.sync_moves()
        monkeypatch.setattr(s.dir, "write", real)
        assert s.sync_moves() == [loc.block_id]
        assert not (tmp_path / "blocks" / f"{loc.block_id:016x}.blk").exists()
        assert s.get(b"k") == b"v" * 5000
        assert s.sync_moves() == []


# ---- 5. argument checks: recent_reads, top --metrics ----

@pytest.mark.parametrize("since", ["0", None, b"1", [0.0], True])
def test_recent_reads_refuses_what_is_not_a_number(tmp_path: Path, since: Any) -> None:
    """It accepted anything: a string compared with floats raised TypeError (None as well), a list too."""
    from blockstore.errors import InvalidArgument

    with _store(tmp_path / "s") as s:
        s.get(b"k0001")
        with pytest.raises(InvalidArgument, match="since"):
            s.recent_reads(since)
        assert len(s.recent_reads(0)) == 1 and s.recent_reads(0.0) == s.recent_reads(0)


def _top(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from blockstore.tools import top

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = top.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_top_with_an_endpoint_it_cannot_read_exits_8(tmp_path: Path) -> None:
    """`blockstore top --metrics <bad URL>` exited 0, the scrape error buried in the table."""
    blockstore.open(tmp_path / "s").close()
    url = "http://127.0.0.1:1/metrics"  # nothing listens on port 1
    for extra in (["--once"], ["--once", "--json"], ["--json"]):  # the live views stop at the first look too
        code, _out, err = _top(str(tmp_path / "s"), "--interval", "0.01", "--metrics", url, *extra)
        assert code == 8, (extra, code, err)
        assert url in err and "Connection refused" in err, err
    code, _out, err = _top(str(tmp_path / "s"), "--once", "--metrics", "127.0.0.1:9100/metrics")
    assert code == 16 and "http://" in err, err
    code, out, _err = _top("--help")
    assert code == 0 and "exit 8" in " ".join(out.split()), out
