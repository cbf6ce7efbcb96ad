"""`blockstore top PATH`: a live view of a store that another process may be writing: throughput, space,
compaction's work ahead (the φ of sealed blocks), and, given the writer's metrics endpoint (`--metrics
URL`), its operation rates, latencies, hit rates and compaction passes.

Read-only, safe beside the writer. A read-only open sees the directory as of the moment it opened (a
RocksDB read-only instance does not follow the writer), so every refresh opens the store afresh: the
writer's group commits put its counters (bytes put, bytes appended) and block table in the directory,
and a new read-only open replays its log, committed but unflushed writes included. Rates are the
differences between two refreshes. Hits are not stored anywhere, so hit rates need `--metrics`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from blockstore.directory import BLOCK_SEALED
from blockstore.errors import BlockstoreError
from blockstore.tools.cli_common import EXIT_ERROR, EXIT_OK, open_read_only
from blockstore.tools.metrics_cmd import run_alone

GC_PHI = 0.5  # the default GC threshold (compaction policy "full"): sealed blocks at or past it are GC's work

Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Frame:
    """One look at the store (and, with --metrics, at its writer's endpoint)."""

    at: float
    stats: dict[str, Any]
    namespaces: int
    sealed_phi: list[float]
    dead_bytes: int
    scraped: Scrape | None = None
    scrape_error: str | None = None
    rates: dict[str, float | None] = field(default_factory=dict)


def look(path: str, metrics_url: str | None) -> Frame:
    """Open the store read-only (afresh: see the module docstring), read what it records, close it."""
    with open_read_only(path) as store:
        stats = store.stats().as_dict()
        table = store.block_table()
        namespaces = len(store.namespaces())
    sealed = [e for e in table if e.state == BLOCK_SEALED]
    frame = Frame(time.monotonic(), stats, namespaces, [e.invalid_ratio for e in sealed],
                  sum(e.dead_bytes for e in sealed))
    if metrics_url:
        try:
            with urllib.request.urlopen(metrics_url, timeout=5) as r:
                frame.scraped = {(s.name, frozenset(s.labels.items())): s.value
                                 for fam in text_string_to_metric_families(r.read().decode("utf-8"))
                                 for s in fam.samples}
        except (OSError, ValueError) as exc:  # the writer restarted, a wrong URL: shown, not fatal
            frame.scrape_error = str(exc)
    return frame


def _total(scraped: Scrape | None, name: str, **labels: str) -> float | None:
    """The sum of a metric's samples whose labels include `labels` (None: not exported)."""
    if scraped is None:
        return None
    want = set(labels.items())
    values = [v for (n, ls), v in scraped.items() if n == name and want <= ls]
    return sum(values) if values else None


def with_rates(cur: Frame, prev: Frame | None) -> Frame:
    """cur, with the rates since prev (None where there is no earlier frame or no such metric)."""
    dt = cur.at - prev.at if prev is not None else 0.0

    def rate(a: float | None, b: float | None) -> float | None:
        return (a - b) / dt if a is not None and b is not None and dt > 0 else None

    def ratio(hits: tuple[float | None, float | None], total: tuple[float | None, float | None]) -> float | None:
        if None in hits or None in total:
            return None
        dh, dn = hits[0] - hits[1], total[0] - total[1]  # type: ignore[operator]
        return dh / dn if dn > 0 else None

    p, c = (prev.stats if prev else {}), cur.stats
    cs, ps = cur.scraped, (prev.scraped if prev else None)
    cur.rates = {
        "put_bytes_s": rate(c["bytes_put"], p.get("bytes_put")),
        "appended_bytes_s": rate(c["bytes_appended"], p.get("bytes_appended")),
        "records_s": rate(c["records"], p.get("records")),
    }
    for op in ("put", "get", "delete"):
        n = (_total(cs, "blockstore_operation_seconds_count", op=op), _total(ps, "blockstore_operation_seconds_count", op=op))
        cur.rates[f"{op}_ops_s"] = rate(*n)
        s = (_total(cs, "blockstore_operation_seconds_sum", op=op), _total(ps, "blockstore_operation_seconds_sum", op=op))
        cur.rates[f"{op}_mean_s"] = ratio(s, n)
    hit = (_total(cs, "blockstore_read_hits_total"), _total(ps, "blockstore_read_hits_total"))
    keys = (_total(cs, "blockstore_operation_keys_total", op="get"), _total(ps, "blockstore_operation_keys_total", op="get"))
    cur.rates["get_hit_ratio"] = ratio(hit, keys)
    for stage, total_kind in (("lookup", "lookup"), ("load", "load")):
        h = (_total(cs, "blockstore_adapter_hits_total", stage=stage), _total(ps, "blockstore_adapter_hits_total", stage=stage))
        k = (_total(cs, "blockstore_adapter_keys_total", kind=total_kind),
             _total(ps, "blockstore_adapter_keys_total", kind=total_kind))
        cur.rates[f"l2_{stage}_hit_ratio"] = ratio(h, k)
    moved = (_total(cs, "blockstore_compaction_pass_moved_bytes_total"),
             _total(ps, "blockstore_compaction_pass_moved_bytes_total"))
    cur.rates["compaction_moved_bytes_s"] = rate(*moved)
    return cur


def _bytes(n: float | None, per_s: bool = False) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            text = f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
            return text + ("/s" if per_s else "")
        n /= 1024
    return str(n)


def _num(x: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.1f} %"


def render(path: str, f: Frame, interval: float) -> Table:
    st, r = f.stats, f.rates
    t = Table(title=f"blockstore top {path}  (every {interval:g} s; Ctrl-C quits)", show_header=True,
              header_style="bold", title_justify="left")
    t.add_column("", style="bold")
    t.add_column("value", justify="right")
    t.add_column("", style="dim")
    t.add_row("records", f"{st['records']:,}", f"{_num(r.get('records_s'))}/s; {f.namespaces} namespace(s)")
    t.add_row("put", _bytes(r.get("put_bytes_s"), True), f"total {_bytes(st['bytes_put'])}")
    t.add_row("appended", _bytes(r.get("appended_bytes_s"), True), f"total {_bytes(st['bytes_appended'])}")
    t.add_row("live", _bytes(st["live_bytes"]), f"logical {_bytes(st['live_logical_bytes'])}")
    t.add_row("blocks", f"{st['blocks']:,}", f"{st['open_blocks']} open; files {_bytes(st['block_file_bytes'])}")
    t.add_row("directory", _bytes(st["directory_bytes"]), "")
    t.add_row("space amp", f"{st['space_amplification']:.3f}x", "(files + directory) / live logical")
    t.add_row("write amp", f"{st['write_amplification']:.3f}x", "appended / put")
    phi = f.sealed_phi
    due = sum(1 for x in phi if x >= GC_PHI)
    t.add_row("gc due", f"{due:,}", f"of {len(phi)} sealed block(s) at φ ≥ {GC_PHI}; mean φ "
              f"{_num(sum(phi) / len(phi) if phi else None, '{:.2f}')}; dead {_bytes(f.dead_bytes)}")
    if f.scraped is None:
        why = f.scrape_error or "pass --metrics URL (the writer's endpoint) for operations, hit rates, compaction"
        t.add_row("writer", "-", why)
        return t
    for op in ("put", "get", "delete"):
        mean = r.get(f"{op}_mean_s")
        t.add_row(f"{op} ops", f"{_num(r.get(f'{op}_ops_s'))}/s", "mean " + _num(None if mean is None else mean * 1e3,
                                                                               "{:.3f} ms"))
    t.add_row("get hits", _percent(r.get("get_hit_ratio")), "keys found / keys read, since the last refresh")
    for stage in ("lookup", "load"):
        if _total(f.scraped, "blockstore_adapter_hits_total", stage=stage) is not None:
            t.add_row(f"L2 {stage} hits", _percent(r.get(f"l2_{stage}_hit_ratio")), "LMCache adapter, since the "
                      "last refresh")
    passes = _total(f.scraped, "blockstore_compaction_passes_total")
    t.add_row("compaction", _bytes(r.get("compaction_moved_bytes_s"), True),
              f"{_num(passes, '{:,.0f}')} pass(es); paced "
              f"{_num(_total(f.scraped, 'blockstore_compaction_paced_seconds_total'), '{:.1f} s')}; copy rate "
              f"{_bytes(_total(f.scraped, 'blockstore_compaction_copy_rate_bytes'), True)}, slowed "
              f"{_num(_total(f.scraped, 'blockstore_compaction_slowed_total'), '{:,.0f}')} time(s) for the "
              "foreground")
    if f.scrape_error:
        t.add_row("writer", "-", f.scrape_error)
    return t


def as_json(path: str, f: Frame) -> dict[str, Any]:
    phi = f.sealed_phi
    return {"path": path, "stats": f.stats, "namespaces": f.namespaces, "rates": f.rates,
            "sealed_blocks": len(phi), "gc_due_blocks": sum(1 for x in phi if x >= GC_PHI),
            "dead_bytes": f.dead_bytes, "scrape_error": f.scrape_error}


def cmd_top(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)
    prev = with_rates(look(path, args.metrics), None)  # a path that is no store fails here (exit 8)
    if prev.scrape_error:  # a wrong URL, or no writer serving there: said once, not a view without its numbers
        return _scrape_failed(args.metrics, prev.scrape_error)
    if args.once:  # one frame, with rates over one interval
        time.sleep(args.interval)
        cur = with_rates(look(path, args.metrics), prev)
        if args.json:
            print(json.dumps(as_json(path, cur)))
        else:
            Console().print(render(path, cur, args.interval))
        return _scrape_failed(args.metrics, cur.scrape_error) if cur.scrape_error else EXIT_OK
    stop = _stop_on_interrupt()
    try:
        if args.json:
            _json_loop(path, args, prev, stop)
        else:
            _live_loop(path, args, prev, stop)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _scrape_failed(url: str, why: str) -> int:
    print(f"blockstore top: cannot read the metrics endpoint {url!r}: {why}", file=sys.stderr)
    return EXIT_ERROR


def _stop_on_interrupt() -> threading.Event:
    """An event Ctrl-C sets, besides raising KeyboardInterrupt as usual: an interrupt that lands inside a
    refresh's store open (a C call that may turn it into an error the refresh reports and survives) still
    ends the view at the next refresh."""
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum: int, frame: Any) -> None:
        stop.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGINT, on_interrupt)
    return stop


def _next_frame(path: str, args: argparse.Namespace, prev: Frame) -> Frame:
    """The next frame; a refresh that fails (the writer mid-way through removing a block file) repeats the
    previous frame with the error, and the view keeps going."""
    try:
        return with_rates(look(path, args.metrics), prev)
    except BlockstoreError as exc:
        return Frame(time.monotonic(), prev.stats, prev.namespaces, prev.sealed_phi, prev.dead_bytes,
                     prev.scraped, f"refresh failed: {exc}", prev.rates)


def _live_loop(path: str, args: argparse.Namespace, prev: Frame, stop: threading.Event) -> None:
    with Live(render(path, prev, args.interval), auto_refresh=False, redirect_stderr=False) as live:
        while not stop.wait(args.interval):
            prev = _next_frame(path, args, prev)
            live.update(render(path, prev, args.interval), refresh=True)


def _json_loop(path: str, args: argparse.Namespace, prev: Frame, stop: threading.Event) -> None:
    while True:
        print(json.dumps(as_json(path, prev)), flush=True)
        if stop.wait(args.interval):
            return
        prev = _next_frame(path, args, prev)


def register(sub: Any) -> None:
    """Add `top` to the `blockstore` command's subparsers."""
    p = sub.add_parser("top", help="a live view of a store (read-only; safe beside its writer)",
                       description=__doc__.split("\n\n", 1)[0].replace("\n", " ") if __doc__ else None)
    p.add_argument("path", help="store directory")
    p.add_argument("--interval", type=_seconds, default=1.0, metavar="S",
                   help=f"seconds between refreshes (default 1, at least {MIN_INTERVAL_S:g})")
    p.add_argument("--once", action="store_true", help="print one frame (rates over one interval) and exit")
    p.add_argument("--metrics", metavar="URL", type=_metrics_url,
                   help="the writing process's metrics endpoint (e.g. http://127.0.0.1:9100/metrics): adds "
                   "operation rates, latencies, hit rates and compaction passes; exit 8 if it cannot be read at "
                   "the start (or, with --once, at either look); later failures are shown and the view goes on")
    p.add_argument("--json", action="store_true", help="one JSON object per refresh instead of the table")
    p.set_defaults(func=cmd_top)


def _metrics_url(text: str) -> str:
    """argparse type of --metrics: an http(s) URL with a host (else a usage error)."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL with a host, got {text!r}")
    return text


MIN_INTERVAL_S = 0.01


def _seconds(text: str) -> float:
    """argparse type of --interval: a finite number of seconds, at least MIN_INTERVAL_S (else a usage error:
    1e-300 was taken and refreshed without pause, a core spent reading the store's counters)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not MIN_INTERVAL_S <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= {MIN_INTERVAL_S:g}, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    return run_alone("top", register, argv)


if __name__ == "__main__":
    sys.exit(main())
