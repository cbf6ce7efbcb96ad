"""Prometheus metrics (issue 17): a real HTTP endpoint (blockstore.metrics.serve) scraped with urllib and
parsed with prometheus_client's parser; the numbers move by exactly what the operations did. Also the
`blockstore metrics PATH` one-shot dump."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import blockstore
from blockstore import logs, metrics
from blockstore.compaction.pacing import Pacer
from blockstore.directory import BLOCK_SEALED
from blockstore.errors import BlockstoreError, InvalidArgument
from blockstore.store import Store
from blockstore.tools import cli, metrics_cmd

BLOCK = 64 << 10  # the smallest block: a few dozen 3000-byte records fill one
VALUE = 3000

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return parse(r.read().decode("utf-8"))


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def endpoint() -> Iterator[metrics.Endpoint]:
    was = metrics.enabled
    ep = metrics.serve(0, addr="127.0.0.1")
    try:
        yield ep
    finally:
        ep.close()
        if not was:
            metrics.disable()


def test_store_gauges_follow_writes_and_deletes(tmp_path: Path, endpoint: metrics.Endpoint) -> None:
    path = str(tmp_path / "s")
    s = blockstore.open(path, block_size=BLOCK)
    metrics.track(s)  # what Store's open does (opening.announce_open); tracking twice is harmless
    for i in range(40):
        s.put(b"k%02d" % i, bytes([i]) * VALUE)
    got = scrape(endpoint.port)
    st = s.stats()
    assert get(got, "blockstore_records", store=path) == 40
    assert get(got, "blockstore_put_bytes_total", store=path) == 40 * (3 + VALUE) == st.bytes_put
    assert get(got, "blockstore_appended_bytes_total", store=path) == st.bytes_appended
    assert get(got, "blockstore_blocks", store=path) == st.blocks >= 2
    assert get(got, "blockstore_write_amplification", store=path) == pytest.approx(st.write_amplification)
    sealed = [e for e in s.block_table() if e.state == BLOCK_SEALED]
    assert get(got, "blockstore_block_invalid_ratio_count", store=path) == len(sealed) >= 1
    assert get(got, "blockstore_block_invalid_ratio_sum", store=path) == 0.0
    assert get(got, "blockstore_recovered", store=path) == 0

    first = sealed[0].block_id  # delete all but one record of the first sealed block: its φ passes 0.9
    doomed = [k for k, loc in s.iter_locations() if loc.block_id == first][1:]
    s.delete_many(doomed)
    got = scrape(endpoint.port)
    assert get(got, "blockstore_records", store=path) == 40 - len(doomed)
    assert get(got, "blockstore_block_invalid_ratio_sum", store=path) == pytest.approx(
        sum(e.invalid_ratio for e in s.block_table() if e.state == BLOCK_SEALED))
    assert get(got, "blockstore_block_invalid_ratio_bucket", store=path, le="0.9") == len(sealed) - 1
    assert get(got, "blockstore_block_invalid_ratio_bucket", store=path, le="1.0") == len(sealed)

    s.close()  # a closed store is no longer exported
    assert not [k for k in scrape(endpoint.port) if ("store", path) in k[1]]


def test_operation_counters_move_by_the_operations_done(tmp_path: Path, endpoint: metrics.Endpoint) -> None:
    with blockstore.open(tmp_path / "s") as s:
        metrics.track(s)  # what Store's open does (opening.announce_open): its put/get/delete become countable
        before = scrape(endpoint.port)
        s.put(b"a", b"x" * 10)
        s.put(b"b", b"y" * 20)
        s.put_many([(b"c%d" % i, b"z" * 30) for i in range(4)])
        assert s.get_many([b"a", b"b", b"nope"])[2] is None
        assert s.get(b"c0") == b"z" * 30
        buf = bytearray(64)
        assert s.get_many([b"c1"], out=[buf]) == [30]
        assert s.delete(b"a")
        with pytest.raises(InvalidArgument):
            s.put(b"", b"empty key")  # put() checks the key itself: not a put_many call
        with pytest.raises(InvalidArgument):
            s.put_many([(b"", b"empty key")])  # a put_many that raised
        after = scrape(endpoint.port)

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    assert delta("blockstore_operation_seconds_count", op="put") == 3  # put() is a put_many of one
    assert delta("blockstore_operation_keys_total", op="put") == 6
    assert delta("blockstore_operation_seconds_count", op="get") == 3
    assert delta("blockstore_operation_keys_total", op="get") == 5
    assert delta("blockstore_read_hits_total") == 4
    assert delta("blockstore_read_bytes_total") == 10 + 20 + 30 + 30
    assert delta("blockstore_operation_seconds_count", op="delete") == 1
    assert delta("blockstore_operation_keys_total", op="delete") == 1
    assert delta("blockstore_operation_seconds_sum", op="get") > 0
    assert delta("blockstore_operation_errors_total", op="put") == 1


def test_nothing_is_counted_or_paid_on_the_hot_path_while_disabled(tmp_path: Path) -> None:
    was = metrics.enabled
    metrics.instrument(Store)  # as tracking a store does
    metrics.disable()
    try:
        assert Store.put_many is metrics.plain_method(Store, "put_many")  # a call costs what it did
        assert not hasattr(Store.get_many, "__wrapped__")
        with blockstore.open(tmp_path / "s") as s:
            before = metrics.REGISTRY.get_sample_value("blockstore_operation_seconds_count", {"op": "put"})
            s.put_many([(b"k", b"v")])
            s.get(b"k")
            assert metrics.REGISTRY.get_sample_value("blockstore_operation_seconds_count", {"op": "put"}) == before
            metrics.enable()
            assert Store.put_many.__wrapped__ is metrics.plain_method(Store, "put_many")  # type: ignore[attr-defined]
            s.put_many([(b"k", b"v")])
            assert metrics.REGISTRY.get_sample_value("blockstore_operation_seconds_count", {"op": "put"}) == before + 1
    finally:
        (metrics.enable if was else metrics.disable)()


def test_compaction_metrics(tmp_path: Path, endpoint: metrics.Endpoint) -> None:
    path = str(tmp_path / "s")
    with blockstore.open(path, block_size=BLOCK,
                         compaction={"policy": "full", "background": False, "gc_budget": 10.0}) as s:
        metrics.track(s)
        for i in range(60):
            s.put(b"k%02d" % i, bytes([i]) * VALUE)
        first = min(e.block_id for e in s.block_table() if e.state == BLOCK_SEALED)
        keys = [k for k, loc in s.iter_locations() if loc.block_id == first]
        s.delete_many(keys[: len(keys) * 3 // 4])  # φ of that block past 0.5: a GC victim
        got = scrape(endpoint.port)
        assert get(got, "blockstore_compaction_passes_total", store=path) == 0
        assert get(got, "blockstore_compaction_gc_invalid_ratio", store=path) == 0.5
        assert get(got, "blockstore_compaction_running", store=path) == 0
        s.compactor.run_until_idle()
        status = s.compactor.status()
        got = scrape(endpoint.port)
        assert status["gc_bytes_total"] > 0 and status["blocks_reclaimed_total"] >= 1
        assert get(got, "blockstore_compaction_gc_bytes_total", store=path) == status["gc_bytes_total"]
        assert get(got, "blockstore_compaction_blocks_reclaimed_total", store=path) == status["blocks_reclaimed_total"]
        assert get(got, "blockstore_compaction_passes_total", store=path) == status["passes"] >= 1
        assert get(got, "blockstore_compaction_failing", store=path) == 0


def test_adapter_counters_are_read_from_its_status(tmp_path: Path, endpoint: metrics.Endpoint) -> None:
    pytest.importorskip("lmcache")
    pytest.importorskip("torch")
    from test_connector_adapter import Arena, load, lookup, okey, store  # lmcache's types: optional here

    from blockstore.connector.l2_adapter import BlockstoreL2Adapter, BlockstoreL2AdapterConfig

    a = BlockstoreL2Adapter(BlockstoreL2AdapterConfig.from_dict({"path": str(tmp_path / "kv"), "compaction": None}))
    arena = Arena()
    try:
        metrics.track_adapter(a)
        label = str(tmp_path / "kv")
        keys = [okey(i) for i in range(3)]
        assert store(a, keys[:2], [arena.new(fill=i) for i in range(2)]).is_successful()
        assert lookup(a, keys) == [True, True, False]
        assert load(a, keys, [arena.new() for _ in keys]) == [True, True, False]
        a.submit_unlock(keys[:2])
        got = scrape(endpoint.port)
        counters = a.report_status()["counters"]
        assert get(got, "blockstore_adapter_keys_total", store=label, kind="lookup") == 3 == counters["lookup_keys"]
        assert get(got, "blockstore_adapter_hits_total", store=label, tier="l2", stage="lookup") == 2
        assert get(got, "blockstore_adapter_hits_total", store=label, tier="l2", stage="load") == 2
        assert get(got, "blockstore_adapter_load_misses_total", store=label, reason="absent") == 1
        assert get(got, "blockstore_adapter_keys_total", store=label, kind="store") == 2
        assert get(got, "blockstore_adapter_records", store=label) == 2
        assert get(got, "blockstore_adapter_healthy", store=label) == 1
        exported = {k[0] for k in got}
        for name in counters:  # every counter the adapter keeps is exported, by a name of its own or as it is
            assert name in metrics.ADAPTER_COUNTERS or f"blockstore_adapter_{name}_total" in exported, name
    finally:
        a.close()
        arena.release()


def test_serve_refuses_a_bad_or_taken_port() -> None:
    with pytest.raises(InvalidArgument):
        metrics.serve(70000)
    with pytest.raises(InvalidArgument):
        metrics.serve("9100")  # type: ignore[arg-type]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(BlockstoreError, match="serve metrics on 127.0.0.1"):
            metrics.serve(taken.getsockname()[1], addr="127.0.0.1")


def _run_metrics_cmd(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = metrics_cmd.main(list(argv))
    return code, out.getvalue()


def test_metrics_command_dumps_a_store_beside_its_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with blockstore.open(path, block_size=BLOCK) as writer:
        for i in range(30):
            writer.put(b"k%02d" % i, bytes([i]) * VALUE)
        code, text = _run_metrics_cmd(path)
        assert code == 0
        got = parse(text)
        assert get(got, "blockstore_records", store=path) == 30
        assert get(got, "blockstore_read_only", store=path) == 1
        assert get(got, "blockstore_put_bytes_total", store=path) == writer.stats().bytes_put
        assert not [k for k in got if k[0].startswith("blockstore_operation")]  # the writer's, not a dump's

        code, text = _run_metrics_cmd(path, "--json")
        doc: dict[str, Any] = json.loads(text)
        assert code == 0 and doc["path"] == path
        by_name = {m["name"]: m for m in doc["metrics"]}
        assert by_name["blockstore_records"]["type"] == "gauge"
        assert by_name["blockstore_records"]["samples"] == [
            {"name": "blockstore_records", "labels": {"store": path}, "value": 30.0}]


def test_metrics_command_errors(tmp_path: Path) -> None:
    assert _run_metrics_cmd(str(tmp_path / "missing"))[0] == metrics_cmd.EXIT_ERROR
    (tmp_path / "empty").mkdir()
    assert _run_metrics_cmd(str(tmp_path / "empty"))[0] == metrics_cmd.EXIT_ERROR
    assert _run_metrics_cmd()[0] == metrics_cmd.EXIT_USAGE


def test_an_open_store_is_tracked_and_counted(tmp_path: Path, endpoint: metrics.Endpoint) -> None:
    """Store's own wiring: tracked from its open (opening.announce_open), its put/get/delete instrumented."""
    path = str(tmp_path / "s")
    before = scrape(endpoint.port)
    with blockstore.open(path) as s:
        assert metrics.is_instrumented(Store, "put_many") and metrics.is_instrumented(Store, "get_many")
        s.put(b"k", b"v" * 100)
        assert s.get(b"k") is not None and s.get(b"nope") is None
        got = scrape(endpoint.port)
        assert get(got, "blockstore_records", store=path) == 1
    after = scrape(endpoint.port)
    assert get(got, "blockstore_operation_seconds_count", op="put") - get(before, "blockstore_operation_seconds_count", op="put") == 1
    assert get(got, "blockstore_read_hits_total") - get(before, "blockstore_read_hits_total") == 1
    assert get(after, "blockstore_blocks_sealed_total") - get(before, "blockstore_blocks_sealed_total") == 1


def test_compaction_passes_are_timed(tmp_path: Path, endpoint: metrics.Endpoint) -> None:
    with blockstore.open(str(tmp_path / "s"), block_size=BLOCK,
                         compaction={"policy": "full", "background": False, "gc_budget": 10.0}) as s:
        for i in range(60):
            s.put(b"k%02d" % i, bytes([i]) * VALUE)
        first = min(e.block_id for e in s.block_table() if e.state == BLOCK_SEALED)
        keys = [k for k, loc in s.iter_locations() if loc.block_id == first]
        s.delete_many(keys[: len(keys) * 3 // 4])
        before = scrape(endpoint.port)
        rep = s.compactor.run_pass()
        got = scrape(endpoint.port)
    assert rep.gc_bytes > 0
    assert get(got, "blockstore_compaction_pass_seconds_count") - get(before, "blockstore_compaction_pass_seconds_count") == 1
    assert (get(got, "blockstore_compaction_pass_moved_bytes_total", kind="gc")
            - get(before, "blockstore_compaction_pass_moved_bytes_total", kind="gc")) == rep.gc_bytes


def test_cli_metrics_and_top_with_log_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "s")
    blockstore.open(path).close()
    try:
        assert cli.main(["-v", "metrics", path]) == 0
        out, err = capsys.readouterr()
        assert f'blockstore_records{{store="{path}"}} 0.0' in out
        assert f"INFO blockstore.open: {path}: opened read-only" in err
        assert cli.main(["top", path, "--once", "--interval", "0.01"]) == 0
        out, err = capsys.readouterr()
        assert f"blockstore top {path}" in out and err == ""  # no INFO lines without -v
    finally:
        logs.unconfigure()


def test_the_foreground_latency_guard_is_reported(endpoint: metrics.Endpoint) -> None:
    slow_reads = Pacer(64e6, None, reads=lambda since: [0.010] * 10, idle_p99=0.001)  # p99 10x idle
    before = scrape(endpoint.port)
    slow_reads(0)
    got = scrape(endpoint.port)
    assert get(got, "blockstore_compaction_slowed_total") - get(before, "blockstore_compaction_slowed_total") == 1
    assert get(got, "blockstore_compaction_copy_rate_bytes") == 32e6
    Pacer(64e6, None, start_rate=32e6, reads=lambda since: [0.001] * 10, idle_p99=0.001)(0)  # at idle: climbs
    assert get(scrape(endpoint.port), "blockstore_compaction_copy_rate_bytes") == 40e6


def test_adapter_metrics_port_serves_the_adapter_and_its_store(tmp_path: Path) -> None:
    pytest.importorskip("lmcache")
    pytest.importorskip("torch")
    from test_connector_adapter import Arena, lookup, okey, store  # lmcache's types: optional here

    from blockstore.connector.l2_adapter import BlockstoreL2Adapter, BlockstoreL2AdapterConfig

    with pytest.raises(InvalidArgument, match="metrics_port"):
        BlockstoreL2AdapterConfig.from_dict({"path": str(tmp_path / "kv"), "metrics_port": 70000})
    was = metrics.enabled
    a = BlockstoreL2Adapter({"path": str(tmp_path / "kv"), "compaction": None, "metrics_port": 0})
    arena = Arena()
    try:
        assert a.metrics_endpoint is not None and metrics.enabled
        keys = [okey(i) for i in range(2)]
        assert store(a, keys, [arena.new(fill=i) for i in range(2)]).is_successful()
        assert lookup(a, keys + [okey(9)]) == [True, True, False]
        a.submit_unlock(keys)
        got = scrape(a.metrics_endpoint.port)
        label = str(tmp_path / "kv")
        assert get(got, "blockstore_adapter_hits_total", store=label, tier="l2", stage="lookup") == 2
        assert get(got, "blockstore_records", store=label) == 2
        assert get(got, "blockstore_operation_keys_total", op="put") >= 2
    finally:
        a.close()
        arena.release()
        if not was:
            metrics.disable()
    with pytest.raises(OSError):
        scrape(a.metrics_endpoint.port)  # closed with the adapter
