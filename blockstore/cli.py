"""`blockstore` command line. `stats` and `dump` open the store read-only, so they are safe beside a
live writer (they see the directory as of the moment they opened); `compact` takes the writer lock.

fsck arrives with its own issue as a further subcommand of the same parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from blockstore.directory import BLOCK_OPEN, BLOCK_RECLAIMING, BLOCK_SEALED
from blockstore.errors import BlockstoreError
from blockstore.records import Kind
from blockstore.store import Store

EXIT_OK = 0
EXIT_ERROR = 8  # operational error (the fsck convention: bitmask, 8 = operational)
EXIT_USAGE = 16

_STATE = {BLOCK_OPEN: "open", BLOCK_SEALED: "sealed", BLOCK_RECLAIMING: "reclaiming"}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_stats(args: argparse.Namespace) -> int:
    with Store(args.path, create=False, read_only=True) as s:
        st = s.stats().as_dict()
        st["namespaces"] = s.namespaces()
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    rows = [
        ("records (live)", f"{st['records']:,}"),
        ("live bytes", _human(st["live_bytes"])),
        ("live logical bytes", _human(st["live_logical_bytes"])),
        ("written bytes (blocks)", _human(st["written_bytes"])),
        ("blocks", f"{st['blocks']:,}"),
        ("block files on disk", _human(st["block_file_bytes"])),
        ("directory on disk", _human(st["directory_bytes"])),
        ("space amplification", f"{st['space_amplification']:.3f}x"),
        ("write amplification", f"{st['write_amplification']:.3f}x"),
        ("namespaces", ", ".join(st["namespaces"]) or "-"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return EXIT_OK


def _block_rows(s: Store) -> list[dict[str, Any]]:
    return [
        {
            "block": f"{e.block_id:016x}", "state": _STATE.get(e.state, str(e.state)),
            "written_bytes": e.written_bytes, "live_bytes": e.live_bytes, "live_records": e.live_records,
            "total_records": e.total_records, "tombstones": e.tombstones,
            "invalid_ratio": round(e.invalid_ratio, 4), "partition": e.partition.decode("utf-8", "replace"),
        }
        for e in s.block_table()
    ]


def _record_rows(s: Store, block_hex: str) -> list[dict[str, Any]]:
    try:
        bid = int(block_hex, 16)
    except ValueError:
        raise BlockstoreError(f"--block takes a block id in hex, got {block_hex!r}") from None
    live = dict(s.dir.block_records(bid))
    fd = s.backend.open_ro(s.blocks.path(bid))
    try:
        res = s.backend.scan(fd, 4096, s.backend.size(fd), verify_payload=True)
    finally:
        s.backend.close(fd)
    rows = [
        {
            "offset": r.offset, "kind": Kind(r.info.kind).name.lower(), "seq": r.info.seq,
            "ns": r.info.ns, "key": r.key.hex(), "payload_len": r.info.payload_len,
            "record_len": r.info.record_len, "live": r.offset in live, "payload_ok": r.payload_ok,
        }
        for r in res.records
    ]
    if res.stop.name == "INVALID":
        rows.append({"offset": res.next_offset, "kind": "invalid", "detail": "scan stopped: invalid or torn record"})
    return rows


def cmd_dump(args: argparse.Namespace) -> int:
    with Store(args.path, create=False, read_only=True) as s:
        if args.keys:
            rows = [{"ns": ns, "key": k.hex()} for ns in s.namespaces() for k in s.iter_keys(ns=ns)]
        elif args.block:
            rows = _record_rows(s, args.block)
        else:
            rows = _block_rows(s)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print("  ".join(f"{k}={v}" for k, v in r.items()))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockstore",
        description="Inspect and maintain blockstore stores (log-structured block stores of KV and chunk "
        "records). stats and dump open the store read-only and are safe beside a running writer; compact "
        "needs the store to itself. Exit codes: 0 ok, 8 operational error, 16 usage error.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    st = sub.add_parser("stats", help="record counts, bytes, blocks, space and write amplification")
    st.add_argument("path", help="store directory")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_stats)
    du = sub.add_parser("dump", help="list blocks (default), one block's records (--block), or keys (--keys)")
    du.add_argument("path", help="store directory")
    g = du.add_mutually_exclusive_group()
    g.add_argument("--block", metavar="HEX", help="scan this block and list its records, live or dead")
    g.add_argument("--keys", action="store_true", help="list every live KV key of every namespace (hex)")
    du.add_argument("--json", action="store_true", help="print a JSON array")
    du.set_defaults(func=cmd_dump)
    # the compaction package owns its command (the engine's own modules never import it)
    from blockstore.compaction.cli import add_parser as add_compact_parser

    add_compact_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    try:
        return int(args.func(args))
    except BlockstoreError as exc:
        print(f"blockstore {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
