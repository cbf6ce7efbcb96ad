"""`blockstore fsck`: check a store against docs/format.md (read-only, safe beside a writer), or with --repair
fix what can be fixed; findings one a line or as JSON, exit codes a bitmask (fsck_report)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections import Counter
from typing import Any

from tqdm import tqdm

from blockstore.errors import BlockstoreError, StoreLocked
from blockstore.tools import fsck
from blockstore.tools.cli_common import UsageError, add_path, namespace
from blockstore.tools.fsck_report import EXIT_CORRECTED, EXIT_UNCORRECTED, KINDS
from blockstore.tools.repair import repair


def register(sub: Any) -> None:
    fs = sub.add_parser(
        "fsck", help="check every block, record and directory entry; --repair fixes what it can",
        description="Check the store against docs/format.md: block headers and footers, every record's header "
        "and payload checksum, directory entries against the records they name, reverse and listing indexes, "
        "block-table counters, namespaces, counters, MANIFEST. Read-only unless --repair: safe beside a running "
        "writer (blocks it has open are checked up to their committed end).",
        epilog=_fsck_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_path(fs)
    fs.add_argument("--repair", action="store_true",
                    help="fix what can be fixed (needs the writer lock); what cannot be saved goes to lost+found/")
    fs.add_argument("--namespace", action="append", metavar="NAME", type=namespace,
                    help="with --repair, when the directory is lost: a namespace name to try for the namespace ids "
                    "found in the blocks (repeatable; 'default' is always tried)")
    fs.add_argument("--json", action="store_true", help="print one JSON document (findings and summary)")
    fs.add_argument("--quiet", action="store_true", help="no progress bar")
    fs.set_defaults(func=cmd_fsck)


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
    if args.namespace and not args.repair:
        raise UsageError("--namespace applies only with --repair")
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
                holder = f"pid {exc.pid}" if exc.pid else "another process"
                raise BlockstoreError(f"store {exc.path!r} is locked by {holder}: --repair needs the store to "
                                      "itself; fsck without --repair is safe beside a writer") from None
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
               # the counts are of the findings reported (a repair's, of every pass), not of its final check
               "summary": {**final.summary(), "findings": len(findings), "by_kind": dict(Counter(f.kind for f in findings)),
                           "corrected": corrected,
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
