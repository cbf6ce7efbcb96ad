"""Compaction policies: which parts run and how eagerly. The benchmark baselines of DESIGN.md §6 are
named policies of the same engine, so a comparison only ever switches these knobs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from blockstore.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class Policy:
    name: str = "full"
    # write placement: records go to their partition's block (user/session, model/lineage); False
    # sends every record to one stream, as a plain log does. The engine places by the partition its
    # callers give; this flag tells callers (the connector, the benchmarks) whether to give one.
    partitioned: bool = True
    # GC: sealed blocks whose invalid ratio (dead bytes / written bytes) reaches this are candidates
    gc: bool = True
    gc_invalid_ratio: float = 0.5  # measured: bench/README.md (compaction), θ sweep on the LoCoMo trace
    # relocation: clusters of records read together (clusters.py: requests merged while they fit a block)
    # are rewritten together when one of their requests sits in more blocks than its bytes need
    relocation: bool = True
    min_hits: int = 2  # times a group must be requested (since its last rewrite) before it is worth one
    # blocks beyond the least a group needs that are tolerated before its cluster is rewritten (0: any spill)
    relocation_slack: int = 1
    # extra bytes relocation may write, as a fraction of the bytes users put (caps write amplification)
    relocation_budget: float = 0.1
    # ...plus this fraction of the bytes read by the requests compaction observes: reads earn moves,
    # so a read-mostly or reopened store keeps relocating (0: writes alone refill the budget). 0.05 since
    # placement keeps blocks full (full mode, seed 0, full/append-only blocks/request and LoCoMo write
    # amp at 0.02 / 0.05 / 0.1: WebArena 0.69 / 0.57 / 0.56, SWE 0.94 / 0.87 / 0.75, shared 0.70 / 0.59
    # / 0.59, LoCoMo 0.56 / 0.56 / 0.54 at write amp 1.26 / 1.43 / 1.63: bench/README.md, compaction)
    relocation_read_budget: float = 0.05
    # what a hole costs relocation: each byte a move takes out of a block that stays is charged this many
    # times the copy GC will make to reclaim it (relocation.hole_cost: u / (1 - u) at the live share u the
    # block will be collected at), in the move's value and against the relocation budget; a byte taken out
    # of a block already past gc_invalid_ratio is free (GC copies it anyway). 0: holes are free, as before.
    # Not a default: 1 writes less but costs SWE and sessions blocks/request, and past 5 only LoCoMo gains
    # (bench/README.md, compaction, "relocation that pays for its holes")
    relocation_hole_cost: float = 0.0
    # GC's budget likewise; GC past it waits for more user writes (space is reclaimed later, not never)
    gc_budget: float = 0.1
    # where copies go: "partition" (GC: the victim's partition; relocation: the partition of the block
    # holding most of the group, so records rejoin the stream their neighbours are written to) or
    # "stream" (one stream for GC copies and one for relocated groups, shared by all partitions)
    copy_to: str = "partition"
    # relocation moves only the records outside the group's main block (True), or the whole group
    stragglers_only: bool = False
    # copies (docs/copies.md): the most extra placed copies of one record. A record read by several clusters
    # gets a copy in another cluster's block instead of being pulled away from the first; copies count in
    # space amplification and die with their key. 0: never copy
    max_copies: int = 0
    # affinity statistics kept (in memory and in the directory): groups, keys per group, keys in all
    max_groups: int = 4096
    max_group_keys: int = 256
    max_tracked_keys: int = 1 << 16
    # background pacing
    interval_s: float = 0.5
    rate_mb_s: float = 64.0  # copy bandwidth; keeps foreground latency close to idle

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


INF = math.inf

POLICIES: dict[str, Policy] = {
    "append-only": Policy("append-only", partitioned=False, gc=False, relocation=False),
    "semantic-only": Policy("semantic-only", gc=False, relocation=False),
    "no-relocation": Policy("no-relocation", relocation=False),
    "no-gc": Policy("no-gc", gc=False),
    "aggressive": Policy("aggressive", gc_invalid_ratio=0.1, min_hits=1, relocation_slack=0, relocation_budget=INF,
                         gc_budget=INF),
    "full": Policy("full"),
}


# What a configuration (the connectors' `compaction` parameter) may say for "no compaction". One list,
# so the two connectors cannot disagree again (one took "off", the other did not).
DISABLED = (False, "none", "off")


def disabled(spec: object) -> bool:
    """Whether a compaction setting means "no compaction" (None is the caller's default, not this)."""
    return isinstance(spec, (bool, str)) and spec in DISABLED


def resolve(spec: str | Policy | dict[str, Any] | None) -> Policy:
    """A Policy from a name, a Policy, or a dict {"policy": name, knob: value, ...}; clear errors."""
    if spec is None:
        return POLICIES["full"]
    if disabled(spec):  # a connector's word for "off" reached a compactor (blockstore.open: None is off)
        raise InvalidArgument(f"compaction {spec!r} is not a policy: for no compaction pass compaction=None "
                              f"(the default) to blockstore.open; a policy is one of {', '.join(POLICIES)}")
    if isinstance(spec, Policy):
        return _validated(spec)
    if isinstance(spec, str):
        if spec not in POLICIES:
            raise InvalidArgument(f"unknown compaction policy {spec!r}; choose one of {', '.join(POLICIES)}")
        return POLICIES[spec]
    if not isinstance(spec, dict):
        raise InvalidArgument(f"compaction must be a policy name or a dict, not {type(spec).__name__}")
    knobs = dict(spec)
    name = knobs.pop("policy", "full")
    if not isinstance(name, str):  # a nested dict was resolved as a policy of its own, its knobs applied unseen
        raise InvalidArgument(f"compaction setting policy must be a policy name, got {name!r}")
    base = resolve(name)
    known = {f.name for f in fields(Policy)} - {"name"}
    unknown = set(knobs) - known
    if unknown:
        raise InvalidArgument(f"unknown compaction setting(s) {sorted(unknown)}; known: {sorted(known)}")
    return _validated(replace(base, **knobs))


def _validated(p: Policy) -> Policy:
    def number(name: str, lo: float, hi: float, integer: bool = False) -> None:
        v = getattr(p, name)
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or not lo <= v <= hi:
            kind = "an int" if integer else "a number"
            raise InvalidArgument(f"compaction setting {name} must be {kind} in [{lo}, {hi}], got {v!r}")

    if p.copy_to not in ("partition", "stream"):
        raise InvalidArgument(f"compaction setting copy_to must be 'partition' or 'stream', got {p.copy_to!r}")
    for flag in ("partitioned", "gc", "relocation", "stragglers_only"):
        if not isinstance(getattr(p, flag), bool):
            raise InvalidArgument(f"compaction setting {flag} must be true or false, got {getattr(p, flag)!r}")
    number("gc_invalid_ratio", 0.01, 1.0)
    number("min_hits", 1, 1 << 30, integer=True)
    number("relocation_budget", 0.0, INF)
    number("relocation_slack", 0, 1 << 20, integer=True)
    number("relocation_read_budget", 0.0, INF)
    number("relocation_hole_cost", 0.0, 1e6)
    number("gc_budget", 0.0, INF)
    number("max_groups", 1, 1 << 24, integer=True)
    number("max_copies", 0, 3, integer=True)
    number("max_group_keys", 2, 1 << 16, integer=True)
    number("max_tracked_keys", 2, 1 << 26, integer=True)
    if p.max_group_keys > p.max_tracked_keys:
        raise InvalidArgument(f"compaction setting max_group_keys ({p.max_group_keys}) cannot exceed "
                              f"max_tracked_keys ({p.max_tracked_keys}): one group would break the memory bound")
    number("interval_s", 0.001, 3600.0)
    number("rate_mb_s", 0.1, INF)
    return p
