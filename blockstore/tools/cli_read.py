"""`blockstore get` (one key's value) and `blockstore scan` (keys with their sizes and blocks), read-only and
safe beside a live writer. Keys are printed escaped (cli_common.escape) or, with --hex, as hex; the same two
forms are accepted as input."""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Iterator
from itertools import islice
from typing import Any

from blockstore.directory import Location
from blockstore.errors import NotFound
from blockstore.store import DEFAULT_NAMESPACE, Store
from blockstore.tools.cli_common import (
    EXIT_OK,
    UsageError,
    add_json,
    add_path,
    escape,
    namespace,
    open_read_only,
    parse_key,
    print_json,
    print_json_rows,
    terminal_text,
)

KEY_FORMS = ("KEY is text, with \\xNN for a byte and \\\\ for a backslash (the form `blockstore scan` prints), "
             "or hex with --hex.")
_BATCH = 1024  # keys located per directory read while scanning (bounds memory whatever the store's size)


def register_get(sub: Any) -> None:
    ge = sub.add_parser(
        "get", help="print one key's value (or write it to --out FILE)",
        description="Write the value stored under KEY to standard output as raw bytes (on a terminal: as text, "
        "control bytes escaped), or to --out FILE. "
        + KEY_FORMS + " A key that is not there is an error (exit 8). Read-only.")
    add_path(ge)
    ge.add_argument("key", metavar="KEY", help="the key (see above for its forms)")
    ge.add_argument("--ns", default=DEFAULT_NAMESPACE, metavar="NAME", type=namespace,
                    help=f"the namespace (default: {DEFAULT_NAMESPACE})")
    ge.add_argument("--hex", action="store_true", help="KEY is hex")
    ge.add_argument("--out", metavar="FILE", help="write the value to FILE instead of standard output")
    add_json(ge, "one object: where the record is, its size, and the value in base64 (unless --out)")
    ge.set_defaults(func=cmd_get)


def _missing(s: Store, key: bytes, ns: str) -> NotFound:
    if s.namespace_id(ns) is None:
        known = ", ".join(s.namespaces()) or "none"
        return NotFound(f"no namespace {ns!r} in this store (it has: {known})")
    return NotFound(f"no key {escape(key)} in namespace {ns!r}")


def cmd_get(args: argparse.Namespace) -> int:
    key = parse_key(args.key, args.hex)
    if not key:
        raise UsageError("KEY is empty")
    with open_read_only(args.path) as s:
        [loc] = s.locate_many([key], ns=args.ns)
        value = s.get(key, ns=args.ns) if loc is not None else None
        if loc is None or value is None:
            raise _missing(s, key, args.ns)
    if args.out:
        with open(args.out, "wb") as f:
            f.write(value)
    if args.json:
        doc: dict[str, Any] = {"ns": args.ns, "key": key.hex(), "size": len(value), **_where(loc)}
        doc["out" if args.out else "value_base64"] = args.out or base64.b64encode(value).decode("ascii")
        print_json(doc)
    elif not args.out and sys.stdout.isatty():  # raw bytes could drive the terminal: show them escaped
        text = terminal_text(value)
        print(text, end="" if text.endswith("\n") else "\n")
    elif not args.out:
        sys.stdout.flush()
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
    return EXIT_OK


def register_scan(sub: Any) -> None:
    sc = sub.add_parser(
        "scan", help="list keys with their value sizes and blocks (--prefix, --limit, --ns)",
        description="List live KV keys in byte order, namespace by namespace (or only --ns), one line each: "
        "ns, key, value size in bytes, the block and offset of its record. Keys are printed escaped (visible "
        "ASCII as is, \\\\ for a backslash, \\xNN for any other byte) or with --hex as hex; --prefix takes the "
        "same form. Read-only.")
    add_path(sc)
    sc.add_argument("--ns", metavar="NAME", type=namespace, help="only this namespace (default: every namespace)")
    sc.add_argument("--prefix", default="", metavar="KEY", help="only keys that start with this (escaped, or hex "
                    "with --hex)")
    sc.add_argument("--hex", action="store_true", help="print keys, and read --prefix, as hex")
    sc.add_argument("--limit", type=_count, metavar="N", help="stop after N keys")
    add_json(sc, "a JSON array (keys in hex)")
    sc.set_defaults(func=cmd_scan)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of keys, at least 1, got {text!r}")
    return value


def _where(loc: Location) -> dict[str, Any]:
    return {"block": f"{loc.block_id:016x}", "offset": loc.offset}


def _scan_rows(s: Store, namespaces: list[str], prefix: bytes) -> Iterator[dict[str, Any]]:
    for ns in namespaces:
        keys = s.iter_keys(ns=ns, prefix=prefix)
        while batch := list(islice(keys, _BATCH)):
            for key, loc in zip(batch, s.locate_many(batch, ns=ns)):
                if loc is not None:  # deleted between the listing and the lookup (a writer beside us)
                    yield {"ns": ns, "key": key, "size": loc.payload_len, **_where(loc)}


def cmd_scan(args: argparse.Namespace) -> int:
    prefix = parse_key(args.prefix, args.hex)
    with open_read_only(args.path) as s:
        if args.ns is not None and s.namespace_id(args.ns) is None:
            raise NotFound(f"no namespace {args.ns!r} in this store (it has: {', '.join(s.namespaces()) or 'none'})")
        rows = islice(_scan_rows(s, [args.ns] if args.ns is not None else s.namespaces(), prefix), args.limit)
        if args.json:
            print_json_rows({**r, "key": r["key"].hex()} for r in rows)
            return EXIT_OK
        for r in rows:
            key = r["key"].hex() if args.hex else escape(r["key"])
            ns = r["ns"] if r["ns"].isprintable() else escape(r["ns"].encode("utf-8", "surrogateescape"))
            print(f"ns={ns}  key={key}  size={r['size']}  block={r['block']}  offset={r['offset']}")
    return EXIT_OK
