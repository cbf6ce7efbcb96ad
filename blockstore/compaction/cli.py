"""`blockstore compact PATH`: run compaction passes on a store that no process has open.

It plans first on the store opened read-only (a dry run of one pass): a dry run stops there and a plan with
nothing in it ends the command, so neither takes the writer lock nor writes a byte (opening RocksDB for
writing alone adds files to the directory). Only a plan with work in it opens the store for writing. A store
another process holds is refused before planning (except for --dry-run, which is read-only).
The output says what was done and, when nothing was, why: no block dead enough, the write budget, no
learned co-read group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, NoReturn

from tqdm import tqdm

from blockstore.blocks import BLOCKS_DIR
from blockstore.directory import BLOCK_SEALED
from blockstore.errors import BlockstoreError, InvalidArgument, NotFound, StoreLocked
from blockstore.lock import held_by
from blockstore.manifest import MANIFEST
from blockstore.opening import DIRECTORY
from blockstore.store import Store

from . import gc
from .compactor import Compactor, PassReport, attach
from .policy import POLICIES, Policy, resolve

EXIT_OK = 0  # as blockstore.tools.cli's (usage errors, exit 16, are argparse's: see the argument types)


def _ratio(text: str) -> float:
    """argparse type of --gc-invalid-ratio: the policy's own check, so a bad value is a usage error (16)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    try:
        resolve({"gc_invalid_ratio": value})
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("compaction setting gc_invalid_ratio ", "")) from None
    return value


def _passes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def register(sub: Any) -> None:
    """Add `compact` to the `blockstore` command (pyproject: the "blockstore.commands" entry point)."""
    co = sub.add_parser(
        "compact",
        help="reclaim dead space (GC) and co-locate records read together (relocation)",
        description="Run compaction passes until there is nothing left to do (or --max-passes). GC copies the "
        "live records out of sealed blocks whose dead/written bytes ratio is at least PHI and deletes those "
        "blocks; relocation rewrites groups of records read together that lie scattered over more blocks "
        "than they need. Both copy at most a share of the bytes put (the write budget; --no-budget lifts it). "
        "Needs the store's writer lock unless there is nothing to do or --dry-run: a store open in a server is "
        "compacted by that process's background compactor instead (open it with compaction=...). Relocation "
        "uses the co-access statistics that store's compactor learned and persisted; GC needs none.",
    )
    co.add_argument("path", help="the store's directory")
    co.add_argument("--policy", default="full", choices=list(POLICIES),
                    help="which parts run and how eagerly (default: full)")
    co.add_argument("--gc-invalid-ratio", type=_ratio, metavar="PHI",
                    help="GC blocks whose dead/written bytes ratio is at least this (policy default 0.5)")
    co.add_argument("--no-budget", action="store_true",
                    help="ignore the write budgets (copy as much as the thresholds allow)")
    co.add_argument("--max-passes", type=_passes, default=100, metavar="N", help="stop after N passes (default 100)")
    co.add_argument("--dry-run", action="store_true",
                    help="report what one pass would move; change nothing (read-only: safe beside a writer)")
    co.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    co.add_argument("--quiet", action="store_true", help="no progress bar")
    co.set_defaults(func=run)


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"policy": args.policy}
    if args.gc_invalid_ratio is not None:
        spec["gc_invalid_ratio"] = args.gc_invalid_ratio
    if args.no_budget:
        spec["relocation_budget"] = spec["gc_budget"] = float("inf")
    return spec


def _require_store(path: str) -> None:
    """The tools' wording for a path that is not a store, word for word (blockstore/tools: fsck_decode's
    require_store and cli_common.open_read_only; tests/test_cli_compact.py compares them)."""
    if not os.path.isdir(path):
        raise NotFound(f"no store at {path!r} (not a directory)")
    if not any(os.path.exists(os.path.join(path, p)) for p in (MANIFEST, BLOCKS_DIR, DIRECTORY)):
        raise NotFound(f"no store at {path!r} (none of {MANIFEST}, {BLOCKS_DIR}/, {DIRECTORY}/ is there)")
    if not os.path.exists(os.path.join(path, MANIFEST)):
        raise NotFound(f"no store at {path!r} (no {MANIFEST} there; `blockstore fsck` checks a damaged one)")


def _progress_bars(args: argparse.Namespace, prefix: str = "") -> tuple[Any, dict[str, tqdm]]:
    """A progress callback for the compactor's passes (one tqdm bar a phase, on stderr, only on a terminal)."""
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int) -> None:
        phase = prefix + phase
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

    return progress, bars


def _plan(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """One dry-run pass on the store opened read-only, and the facts that explain it."""
    with Store(args.path, create=False, read_only=True) as store:
        c = attach(store, spec, background=False)
        progress, bars = _progress_bars(args, prefix="plan ")
        try:
            rep = c.run_until_idle(dry_run=True, progress=progress)
        finally:
            for bar in bars.values():
                bar.close()
            c.stop()  # the store is read-only: stop() writes nothing
        return {"report": rep, "facts": _facts(store, c, rep), "stats": store.stats()}


def _facts(store: Store, c: Compactor, rep: PassReport) -> dict[str, Any]:
    """Why a pass moves what it moves (`rep`: a plan, or a finished run): the blocks dead enough for GC and
    why those not collected were left, and the write budgets."""
    p: Policy = c.policy
    table = store.block_table()
    candidates = gc.victims(table, p.gc_invalid_ratio) if p.gc else []
    min_seqs = gc.MinSeqs(store)
    min_seqs.snapshot(table)
    tombstones = [e for e in candidates if gc.only_needed_tombstones(e, min_seqs)]
    chosen = set(rep.planned_victims) if rep.dry_run else set()  # after a run, the collected ones are gone
    damaged = [e for e in candidates if e.block_id in c.damaged_blocks]
    over_budget = [e for e in candidates if e not in tombstones and e not in damaged and e.block_id not in chosen]
    sealed = [e for e in table if e.state == BLOCK_SEALED and e.written_bytes]
    worst = max(sealed, key=lambda e: e.invalid_ratio, default=None)
    def budget(fraction: float, spent: int, read_fraction: float | None) -> dict[str, Any]:
        """A write budget as the compactor counts it (Compactor.budget_left): a share of the bytes put, plus
        (relocation) a share of the bytes read, each with its own fraction."""
        reads = read_fraction is not None
        allowed = None if math.isinf(fraction) else int(c.budget_left(0, fraction, reads=reads))
        put_bytes, read_bytes = store.io_counters()[0], (c.read_bytes if reads else 0)
        return {"fraction": None if allowed is None else fraction,
                "read_fraction": None if allowed is None else read_fraction,
                "earned_by": "put and read" if reads else "put", "put_bytes": put_bytes, "read_bytes": read_bytes,
                "earned_bytes": put_bytes + read_bytes, "allowed_bytes": allowed, "spent_bytes": spent}

    return {
        "gc_invalid_ratio": p.gc_invalid_ratio if p.gc else None,
        "gc_candidates": [f"{e.block_id:016x}" for e in candidates],
        "gc_left_for_tombstones": [f"{e.block_id:016x}" for e in tombstones],
        "gc_left_over_budget": [f"{e.block_id:016x}" for e in over_budget],
        "gc_left_damaged": [f"{e.block_id:016x}" for e in damaged],
        "most_dead_block": None if worst is None else {"block": f"{worst.block_id:016x}",
                                                       "invalid_ratio": round(worst.invalid_ratio, 4)},
        "relocation": p.relocation, "gc": p.gc,
        "gc_budget": budget(p.gc_budget, c.gc_bytes, None),
        "relocation_budget": budget(p.relocation_budget, c.relocated_bytes, p.relocation_read_budget),
    }


def _refuse_in_use(exc: StoreLocked) -> NoReturn:
    holder = f"pid {exc.pid}" if exc.pid else "another process"
    raise BlockstoreError(f"store {exc.path!r} is locked by {holder}: a store in use is compacted inside the "
                          "process that holds it (blockstore.open(path, compaction='full')); stop that writer to "
                          "compact here, or look with --dry-run") from None


def run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    _require_store(args.path)
    holder = None if args.dry_run else held_by(args.path)
    if holder is not None:  # refused whether or not there is work: the holder's compactor is the one to ask
        _refuse_in_use(StoreLocked(args.path, holder or None))
    plan = _plan(args, spec)
    before, rep, facts = plan["stats"], plan["report"], plan["facts"]
    after = before
    wrote = False
    if not args.dry_run and (rep.planned_victims or rep.planned_groups):
        try:
            store = Store(args.path, create=False)
        except StoreLocked as exc:  # a writer that started since the check above
            _refuse_in_use(exc)
        with store:
            before = store.stats()
            c = attach(store, spec, background=False)
            progress, bars = _progress_bars(args)
            try:
                rep = c.run_until_idle(max_passes=args.max_passes, progress=progress)
            finally:
                for bar in bars.values():
                    bar.close()
                c.stop()
            after = store.stats()
            facts = _facts(store, c, rep)
            wrote = True
    out = {
        "policy": args.policy, **rep.as_dict(), "dry_run": args.dry_run, "wrote": wrote, **facts,
        "before": {"blocks": before.blocks, "space_amp": before.space_amplification,
                   "write_amp": before.write_amplification},
        "after": {"blocks": after.blocks, "space_amp": after.space_amplification,
                  "write_amp": after.write_amplification},
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for line in describe(out, rep):
            print(line)
    return EXIT_OK


def describe(out: dict[str, Any], rep: PassReport) -> list[str]:
    """The text report: what was done (or would be), and for each part that did nothing, why."""
    dry = out["dry_run"]
    lines = [f"policy {out['policy']}{' (dry run: one pass planned, nothing changed)' if dry else ''}"]
    if not out["relocation"]:
        lines.append("relocation: off in this policy")
    elif dry and rep.planned_groups:
        n = len(rep.planned_groups)
        lines.append(f"relocation: would rewrite {n} scattered group{'s' if n > 1 else ''}, copying about "
                     f"{rep.planned_bytes - rep.planned_gc_bytes:,} bytes")
    elif rep.relocated_groups:
        lines.append(f"relocation: rewrote {rep.relocated_groups} groups ({rep.relocated_records} records, "
                     f"{rep.relocated_bytes:,} bytes)")
    elif rep.skipped_budget_relocation:  # scattered and due, but the write budget holds them back
        n = rep.skipped_budget_relocation
        lines.append(f"relocation: {n} scattered cluster{'s' if n > 1 else ''} left over the write budget")
    elif rep.skipped_shadow:
        lines.append(f"relocation: nothing worth rewriting ({rep.skipped_shadow} scattered cluster(s) whose move "
                     "would not save their readers a block)")
    else:
        lines.append("relocation: nothing to rewrite (no learned co-read group is scattered over more blocks than "
                     "it needs; groups are learned from reads by a store opened with compaction=...)")
    lines += _describe_gc(out, rep, dry)
    if rep.stopped:
        lines.append(f"gc stopped, its last pass short of room: {rep.stopped}")
    if rep.skipped_budget:
        lines.append(_describe_budget(out))
    if out["wrote"]:
        b, a = out["before"], out["after"]
        lines.append(f"blocks {b['blocks']} -> {a['blocks']}; space amplification {b['space_amp']:.3f} -> "
                     f"{a['space_amp']:.3f}; write amplification {b['write_amp']:.3f} -> {a['write_amp']:.3f}")
    else:
        lines.append(f"nothing written; blocks {out['before']['blocks']}, space amplification "
                     f"{out['before']['space_amp']:.3f}")
    return lines


def _describe_gc(out: dict[str, Any], rep: PassReport, dry: bool) -> list[str]:
    if not out["gc"]:
        return ["gc: off in this policy"]
    phi = out["gc_invalid_ratio"]
    worst = out["most_dead_block"]
    if dry:
        line = (f"gc: would collect {len(rep.planned_victims)} of the {len(out['gc_candidates'])} blocks {phi:.0%} "
                f"or more dead, copying about {rep.planned_gc_bytes:,} live bytes")
    elif rep.gc_blocks:
        line = (f"gc: collected {rep.gc_blocks} blocks ({rep.gc_records} records, {rep.gc_bytes:,} live bytes "
                f"copied), {rep.reclaimed_blocks} blocks reclaimed")
        if rep.tombstones_carried or rep.tombstones_dropped:
            line += f"; tombstones carried {rep.tombstones_carried}, dropped {rep.tombstones_dropped}"
    else:
        line = "gc: collected nothing"
    if not out["gc_candidates"] and not rep.gc_blocks:
        most = "no sealed block" if worst is None else \
            f"the most dead is {_below(worst['invalid_ratio'], phi)} (block {worst['block']})"
        return [f"gc: nothing to collect: no sealed block is {phi:.0%} or more dead bytes; {most}"]
    left = []
    if out["gc_left_over_budget"]:
        left.append(f"{len(out['gc_left_over_budget'])} over the write budget")
    if out["gc_left_for_tombstones"]:
        left.append(f"{len(out['gc_left_for_tombstones'])} holding nothing dead but tombstones that older records still need")
    if rep.skipped_room:
        left.append(f"{rep.skipped_room} whose live records did not fit the free space (the disk is low: free space "
                    "on it and run compact again)")
    if out.get("gc_left_damaged"):
        left.append(f"{len(out['gc_left_damaged'])} damaged (a record that does not verify, or the file missing; "
                    "the log names each): run blockstore fsck --repair")
    if left:
        line += f"; left: {', '.join(left)}"
    return [line]


def _below(ratio: float, phi: float) -> str:
    """`ratio` (under `phi`) as a percentage with the digits that tell it from `phi` (9.97%, not 10%)."""
    for digits in range(3):
        text = f"{ratio:.{digits}%}"
        if text != f"{phi:.{digits}%}":
            return text
    return f"{ratio:.2%}"


def _describe_budget(out: dict[str, Any]) -> str:
    parts = []
    for name in ("gc", "relocation"):
        b = out[f"{name}_budget"]
        if out[name] and b["allowed_bytes"] is not None:
            earned = f"{b['fraction']:.0%} of the {b['put_bytes']:,} bytes put"
            if b["read_fraction"] is not None:
                earned += f" and {b['read_fraction']:.0%} of the {b['read_bytes']:,} bytes read"
            parts.append(f"{name} may copy {earned} ({b['allowed_bytes']:,} bytes) and has copied "
                         f"{b['spent_bytes']:,}")
    return f"write budget: {'; '.join(parts)}; use --no-budget to ignore it"
