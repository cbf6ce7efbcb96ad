"""`blockstore compact PATH`: run compaction passes on a store that no process has open."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tqdm import tqdm

from blockstore.errors import BlockstoreError, InvalidArgument, StoreLocked
from blockstore.manifest import MANIFEST
from blockstore.store import Store

from .compactor import attach
from .policy import POLICIES, resolve


def register(sub: Any) -> None:
    """Add `compact` to the `blockstore` command (pyproject: the "blockstore.commands" entry point)."""
    co = sub.add_parser(
        "compact",
        help="reclaim dead space (GC) and co-locate records read together (relocation)",
        description="Run compaction passes until there is nothing left to do (or --max-passes). Needs the "
        "store's writer lock: a store open in a server is compacted by that process's background "
        "compactor instead (open it with compaction=...). Relocation uses the co-access statistics that "
        "store's compactor learned and persisted; GC needs none.",
    )
    co.add_argument("path", help="store directory")
    co.add_argument("--policy", default="full", choices=list(POLICIES),
                    help="which parts run and how eagerly (default: full)")
    co.add_argument("--gc-invalid-ratio", type=float, metavar="PHI",
                    help="GC blocks whose dead/written bytes ratio is at least this (policy default 0.5)")
    co.add_argument("--no-budget", action="store_true",
                    help="ignore the write budgets (copy as much as the thresholds allow)")
    co.add_argument("--max-passes", type=int, default=100, metavar="N", help="stop after N passes (default 100)")
    co.add_argument("--dry-run", action="store_true", help="report what would be moved; change nothing")
    co.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    co.add_argument("--quiet", action="store_true", help="no progress bar")
    co.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {"policy": args.policy}
    if args.gc_invalid_ratio is not None:
        spec["gc_invalid_ratio"] = args.gc_invalid_ratio
    if args.no_budget:
        spec["relocation_budget"] = spec["gc_budget"] = float("inf")
    try:
        if args.max_passes < 1:
            raise InvalidArgument("--max-passes must be at least 1")
        resolve(spec)
    except InvalidArgument as exc:  # a bad flag value is a usage error (exit 16), like a bad flag
        flag = str(exc).replace("compaction setting gc_invalid_ratio", "--gc-invalid-ratio")
        print(f"blockstore compact: {flag}", file=sys.stderr)
        return 16
    if not os.path.exists(os.path.join(args.path, MANIFEST)):
        raise BlockstoreError(f"no blockstore store at {args.path!r} (no {MANIFEST} there)")
    try:
        store = Store(args.path, create=False)
    except StoreLocked as exc:
        raise BlockstoreError(f"{exc}. A store in use is compacted inside the process that holds it "
                              "(blockstore.open(path, compaction='full'))") from None
    with store:
        before = store.stats()
        c = attach(store, spec, background=False)
        bars: dict[str, tqdm] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if args.quiet or args.json:
                return
            bar = bars.get(phase)
            if bar is None or bar.total != total:
                if bar is not None:
                    bar.close()
                bar = bars[phase] = tqdm(total=total, desc=phase, unit="item", file=sys.stderr, leave=False,
                                         disable=None)  # None: only on a terminal
            bar.n = done + 1
            bar.refresh()

        try:
            rep = c.run_until_idle(max_passes=args.max_passes, dry_run=args.dry_run, progress=progress)
        finally:
            for bar in bars.values():
                bar.close()
            c.stop()
        after = store.stats()
    out = {
        "policy": c.policy.name, "dry_run": args.dry_run, **rep.as_dict(),
        "before": {"blocks": before.blocks, "space_amp": before.space_amplification,
                   "write_amp": before.write_amplification},
        "after": {"blocks": after.blocks, "space_amp": after.space_amplification,
                  "write_amp": after.write_amplification},
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"policy {c.policy.name}{' (dry run)' if args.dry_run else ''}")
    if args.dry_run:
        print(f"relocation: {len(rep.planned_groups)} scattered groups to rewrite")
        print(f"gc: {len(rep.planned_victims)} victim blocks; about {rep.planned_bytes:,} bytes to copy in all")
    else:
        print(f"relocation: {rep.relocated_groups} groups, {rep.relocated_records} records, "
              f"{rep.relocated_bytes:,} bytes rewritten")
        print(f"gc: {rep.gc_blocks} victim blocks, {rep.gc_records} records, {rep.gc_bytes:,} bytes copied; "
              f"{rep.reclaimed_blocks} blocks reclaimed; tombstones carried {rep.tombstones_carried}, "
              f"dropped {rep.tombstones_dropped}")
    if rep.skipped_budget:
        print(f"skipped over the write budget: {rep.skipped_budget} (use --no-budget to ignore it)")
    print(f"blocks {before.blocks} -> {after.blocks}; space amplification {before.space_amplification:.3f} -> "
          f"{after.space_amplification:.3f}; write amplification {before.write_amplification:.3f} -> "
          f"{after.write_amplification:.3f}")
    return 0
