"""`blockstore` command line. `stats`, `dump` and `fsck` open the store read-only, so they are safe
beside a live writer (they see the directory as of the moment they opened); `compact` and
`fsck --repair` take the writer lock. `compact` is compaction's: blockstore.compaction.cli registers it
through the "blockstore.commands" entry point (see _add_registered_commands).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from importlib.metadata import entry_points
from typing import Any

from tqdm import tqdm

from blockstore import __version__
from blockstore.directory import BLOCK_OPEN, BLOCK_RECLAIMING, BLOCK_SEALED
from blockstore.errors import BlockstoreError, NotFound, StoreLocked
from blockstore.manifest import MANIFEST
from blockstore.records import Kind
from blockstore.store import Store
from blockstore.tools import fsck
from blockstore.tools.fsck_decode import require_store
from blockstore.tools.fsck_report import EXIT_CORRECTED, EXIT_UNCORRECTED, KINDS
from blockstore.tools.repair import repair

COMMANDS = "blockstore.commands"  # the entry-point group of commands other packages add

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


def _open_read_only(path: str) -> Store:
    """The store at `path`, read-only. A path that is not a store is said as fsck says it, "no store at
    PATH (why)", without the engine's hint to pass create=True (no command takes it)."""
    root = require_store(path)
    if not os.path.exists(os.path.join(root, MANIFEST)):
        raise NotFound(f"no store at {root!r} (no {MANIFEST} there; `blockstore fsck` checks a damaged one)")
    return Store(root, create=False, read_only=True)


def cmd_stats(args: argparse.Namespace) -> int:
    with _open_read_only(args.path) as s:
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
    with _open_read_only(args.path) as s:
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


def _fsck_epilog() -> str:
    out = ["Findings, one per line: <kind> <block>[:<offset>] <detail> (block as in `blockstore dump`, '-' for",
           "the store as a whole); OK when there are none. Kinds, and what --repair does:", ""]
    for kind, (meaning, action) in KINDS.items():
        out.append(kind)
        out += textwrap.wrap(meaning, 96, initial_indent="    ", subsequent_indent="    ")
        out += textwrap.wrap("repair: " + action, 96, initial_indent="    ", subsequent_indent="            ")
    out += ["", "Exit codes (a bitmask): 0 clean, 1 findings corrected, 4 findings left uncorrected (every finding",
            "of a check without --repair), 8 operational error (not a store, I/O error, store locked by a",
            "writer for --repair), 16 usage error. Repair leaves what it cannot re-attach in PATH/lost+found/",
            "(fsck-log.jsonl there says what and why); docs/fsck.md has the details."]
    return "\n".join(out)


def cmd_fsck(args: argparse.Namespace) -> int:
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if args.quiet or args.json:
            return
        if bar is None:  # disable=None: only on a terminal
            bar = tqdm(total=total, desc="fsck", unit="B", unit_scale=True, file=sys.stderr, leave=False,
                       disable=None)
        elif done < bar.n or total != bar.total:  # --repair checks again after each phase
            bar.reset(total=total)
        bar.n = min(done, total)
        bar.refresh()

    refused = None
    lost_found: list[str] = []
    try:
        if args.repair:
            try:
                res = repair(args.path, namespaces=args.namespace or (), progress=progress)
            except StoreLocked as exc:
                raise BlockstoreError(f"{exc}. --repair needs the store to itself; fsck without --repair is "
                                      "safe beside a writer") from None
            findings, final, refused, lost_found = res.findings, res.final, res.refused, res.lost_found
        else:
            final = fsck.check(args.path, progress=progress)
            findings = final.findings
    finally:
        if bar is not None:
            bar.close()
    corrected = sum(1 for f in findings if f.corrected)
    left = len(findings) - corrected
    code = (EXIT_CORRECTED if corrected else 0) | (EXIT_UNCORRECTED if left else 0)
    if args.json:
        doc = {"path": args.path, "mode": "repair" if args.repair else "check",
               "findings": [f.as_dict() for f in findings],
               "summary": {**final.summary(), "findings": len(findings), "corrected": corrected,
                           "uncorrected": left, "refused": refused, "lost_found": lost_found},
               "exit_code": code}
        print(json.dumps(doc, indent=2))
    else:
        for f in findings:
            print(f.line())
        if not findings:
            print("OK")
    if not args.json:
        for note in final.notes:
            print(f"blockstore fsck: note: {note}", file=sys.stderr)
        if refused:
            print(f"blockstore fsck: repair refused: {refused}", file=sys.stderr)
        if findings:
            print(f"blockstore fsck: {len(findings)} findings, {corrected} corrected, {left} left"
                  + (f"; {len(lost_found)} files written to lost+found/" if lost_found else ""), file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockstore",
        description="Inspect and maintain blockstore stores (log-structured block stores of KV and chunk "
        "records). stats, dump and fsck open the store read-only and are safe beside a running writer; compact "
        "and fsck --repair need the store to itself. Exit codes: 0 ok, 8 operational error, 16 usage error "
        "(fsck adds 1 corrected and 4 left uncorrected).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    fs = sub.add_parser(
        "fsck", help="check every block, record and directory entry; --repair fixes what it can",
        description="Check the store against docs/format.md: block headers and footers, every record's header "
        "and payload checksum, directory entries against the records they name, reverse and listing indexes, "
        "block-table counters, namespaces, counters, MANIFEST. Read-only unless --repair: safe beside a running "
        "writer (blocks it has open are checked up to their committed end).",
        epilog=_fsck_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fs.add_argument("path", help="store directory")
    fs.add_argument("--repair", action="store_true",
                    help="fix what can be fixed (needs the writer lock); what cannot be saved goes to lost+found/")
    fs.add_argument("--namespace", action="append", metavar="NAME",
                    help="with --repair, when the directory is lost: a namespace name to try for the namespace ids "
                    "found in the blocks (repeatable; 'default' is always tried)")
    fs.add_argument("--json", action="store_true", help="print one JSON document (findings and summary)")
    fs.add_argument("--quiet", action="store_true", help="no progress bar")
    fs.set_defaults(func=cmd_fsck)
    _add_registered_commands(sub)
    return p


def _add_registered_commands(sub: Any) -> None:
    """Commands other packages register as entry points of the group COMMANDS (pyproject.toml's
    [project.entry-points."blockstore.commands"]): each names a function that adds its subparser to
    `sub`. Compaction's `compact` comes this way, so neither the engine nor its tools import compaction.
    A command that fails to load is left out with a warning: stats, dump and fsck must keep working."""
    for ep in sorted(entry_points(group=COMMANDS), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken plugin must not take fsck down with it
            print(f"blockstore: command {ep.name!r} ({ep.value}) is unavailable: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "namespace", None) and not args.repair:
            parser.error("fsck: --namespace applies only with --repair")
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    try:
        return int(args.func(args))
    except BlockstoreError as exc:
        print(f"blockstore {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # fsck reads and moves files itself: an OS error is an operational error too
        print(f"blockstore {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
