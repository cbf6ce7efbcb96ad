"""`blockstore stats` and `blockstore dump`: what a store holds, read-only (safe beside a live writer)."""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Iterator
from typing import Any

from blockstore.directory import BLOCK_OPEN, BLOCK_RECLAIMING, BLOCK_SEALED
from blockstore.errors import IOErrorBS, NotFound
from blockstore.records import BLOCK_HEADER_SIZE, Kind
from blockstore.store import Store
from blockstore.tools.cli_common import (
    EXIT_OK,
    add_json,
    add_path,
    block_id,
    escape,
    human,
    open_read_only,
    print_json,
    print_json_rows,
)

_STATE = {BLOCK_OPEN: "open", BLOCK_SEALED: "sealed", BLOCK_RECLAIMING: "reclaiming"}


def register_stats(sub: Any) -> None:
    st = sub.add_parser(
        "stats", help="record counts, bytes, blocks, space and write amplification",
        description="Print what the store holds: live records and bytes, bytes written to blocks, blocks, the "
        "space on disk of blocks and directory, space amplification (block bytes on disk / live bytes) and "
        "write amplification (bytes appended / bytes put), and the namespaces. Read-only.")
    add_path(st)
    add_json(st, "one object (every counter, in bytes)")
    st.set_defaults(func=cmd_stats)


def cmd_stats(args: argparse.Namespace) -> int:
    with open_read_only(args.path) as s:
        st = s.stats().as_dict()
        st["namespaces"] = s.namespaces()
    if args.json:
        print_json(st)
        return EXIT_OK
    rows = [
        ("records (live)", f"{st['records']:,}"),
        ("live bytes", human(st["live_bytes"])),
        ("live logical bytes", human(st["live_logical_bytes"])),
        ("written bytes (blocks)", human(st["written_bytes"])),
        ("blocks", f"{st['blocks']:,}"),
        ("block files on disk", human(st["block_file_bytes"])),
        ("directory on disk", human(st["directory_bytes"])),
        ("space amplification", f"{st['space_amplification']:.3f}x"),
        ("write amplification", f"{st['write_amplification']:.3f}x"),
        ("namespaces", ", ".join(st["namespaces"]) or "-"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return EXIT_OK


def register_dump(sub: Any) -> None:
    du = sub.add_parser(
        "dump", help="list blocks (default), one block's records (--block), or keys (--keys)",
        description="List the block table (one line a block: id, state, bytes written and live, records, "
        "dead ratio, partition), or with --block every record a scan of that block file finds, live or dead, "
        "or with --keys every live KV key of every namespace (hex). Text output is key=value pairs, bytes "
        "escaped (\\xNN) so no control byte reaches the terminal. Read-only.")
    add_path(du)
    g = du.add_mutually_exclusive_group()
    g.add_argument("--block", metavar="HEX", type=block_id, help="scan this block and list its records, live or dead")
    g.add_argument("--keys", action="store_true", help="list every live KV key of every namespace (hex)")
    add_json(du, "a JSON array")
    du.set_defaults(func=cmd_dump)


def _block_rows(s: Store) -> list[dict[str, Any]]:
    return [
        {
            "block": f"{e.block_id:016x}", "state": _STATE.get(e.state, str(e.state)),
            "written_bytes": e.written_bytes, "live_bytes": e.live_bytes, "live_records": e.live_records,
            "total_records": e.total_records, "tombstones": e.tombstones,
            "invalid_ratio": round(e.invalid_ratio, 4), "partition": escape(e.partition),
        }
        for e in s.block_table()
    ]


def _record_rows(s: Store, bid: int) -> list[dict[str, Any]]:
    if bid not in {e.block_id for e in s.block_table()}:
        raise NotFound(f"no block {bid:016x} in the block table (`blockstore dump` lists them)")
    live = dict(s.dir.block_records(bid))
    path = s.blocks.path(bid)
    if os.path.isdir(path):  # open and size succeed on a folder: it listed nothing, exit 0, like an empty block
        raise IOErrorBS(errno.EISDIR, f"cannot read block file {path}: it is a folder")
    fd = s.backend.open_ro(path)
    try:
        size = s.backend.size(fd)
        if size < BLOCK_HEADER_SIZE:  # a scan from past the end was refused as 'scan block: InvalidArgument'
            return [{"offset": size, "kind": "invalid", "detail": f"the file ends at {size}, inside its block header"}]
        res = s.backend.scan(fd, BLOCK_HEADER_SIZE, size, verify_payload=True)
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


def _key_rows(s: Store) -> Iterator[dict[str, Any]]:
    for ns in s.namespaces():
        for k in s.iter_keys(ns=ns):
            yield {"ns": ns, "key": k.hex()}


def _printable(value: Any) -> Any:
    """A text field as the terminal should get it: a name with a control byte in it is escaped."""
    if isinstance(value, str) and not value.isprintable():
        return escape(value.encode("utf-8", "surrogateescape"))
    return value


def cmd_dump(args: argparse.Namespace) -> int:
    with open_read_only(args.path) as s:
        rows: Any = _key_rows(s) if args.keys else _record_rows(s, args.block) if args.block is not None \
            else _block_rows(s)
        if args.json:
            print_json_rows(rows)
        else:
            for r in rows:
                print("  ".join(f"{k}={_printable(v)}" for k, v in r.items()))
    return EXIT_OK
