"""Clusters: the tracker's co-access groups merged into disjoint sets of records that fit one block.

Relocating each learned group on its own (the first design) left most locality on the table wherever
requests overlap (issue 16: SWE, LMCache-shaped, shared documents, mixed sessions reached 0.84-1.11 of
append-only against floors of 0.27-0.36): a record read by several groups could be in only one of
them, so each group's rewrite either pulled it away from the last one or, with first-claim-wins,
left every later group spread over the claimant's block and its own.

Here groups are merged greedily, the most valuable first (hits decayed by age, the tracker's score),
while the merged set's live bytes still fit one block: groups that share records, and groups that
share records with those, end up in one cluster, so the records they read land in one block together,
whichever of them comes next. A group too big to join its neighbours brings its new records to the
cluster holding most of its records if they fit, else starts a cluster of its own. Every record
belongs to at most one cluster, so relocation never fights over a record, and a cluster already in
one block is left alone: placement settles instead of churning.

Nothing here depends on a workload's shape: the only size is the block's usable bytes (what the
offline floor in bench/compaction.py counts as one block), and the only order is the tracker's score.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blockstore import foreground

if TYPE_CHECKING:
    from .affinity import Group


@dataclass(slots=True, eq=False)
class Cluster:
    """Records to keep in one block: `keys` in the order their groups joined (the hottest first)."""

    gid: int  # the id of its most valuable group (names the cluster in hooks and logs)
    keys: list[bytes] = field(default_factory=list)
    gids: list[int] = field(default_factory=list)  # every group merged into it
    nbytes: int = 0
    due: bool = False  # one of its groups was requested min_hits times since it was last rewritten
    # records other clusters own that its groups also read: copies of them go with its next rewrite
    # (docs/copies.md), so those groups find them in its block too
    borrowed: list[bytes] = field(default_factory=list)
    borrowed_bytes: int = 0


def build(groups: Sequence[tuple[Group, bool]], sizes: Mapping[bytes, int], capacity: int,
          previous: Sequence[tuple[int, Sequence[bytes]]] = ()) -> list[Cluster]:
    """Disjoint clusters of at most `capacity` live bytes from (group, due) pairs, most valuable first;
    `sizes` holds each live record's length (records without one are gone and left out). Clusters of
    fewer than two records are dropped: one record is always in one block. `previous` (id, keys) are
    the clusters the last build made: each starts out as it was (less its records no group reads any
    more), and groups join them as they join any cluster. Without that, a cluster's make-up followed
    the groups' order by score, which shifts with every request: the same records were regrouped pass
    after pass, and each regrouping was a rewrite (aggressive compaction wrote 5-13x the bytes put)."""
    owner: dict[bytes, Cluster] = {}
    made: list[Cluster] = []
    degree: Counter[bytes] = Counter(k for g, _due in groups for k in set(g.keys))
    for gid, keys in previous:
        seed = _new(gid, made)
        for k in keys:
            if k in sizes and degree[k] and k not in owner and seed.nbytes + sizes[k] <= capacity:
                owner[k] = seed
                seed.keys.append(k)
                seed.nbytes += sizes[k]
    # records several groups read are clustered first, then each group whole: a record many requests
    # share (a popular document, a system prompt, a core file) is placed with the others they share, not
    # in whichever private cluster happened to be hottest, and every sharer then finds it in one place;
    # a group's private records join its shared ones where they fit
    parts = [(g, due, [k for k in dict.fromkeys(g.keys) if k in sizes and degree[k] > 1]) for g, due in groups]
    parts += [(g, due, [k for k in dict.fromkeys(g.keys) if k in sizes]) for g, due in groups]
    for g, due, live in parts:
        foreground.step_aside()  # planning is Python: on the background thread, reads go first
        if len(live) < 2:
            continue
        homes = list({id(owner[k]): owner[k] for k in live if k in owner}.values())
        new = [k for k in live if k not in owner]
        add = sum(sizes[k] for k in new)
        target: Cluster | None
        if sum(c.nbytes for c in homes) + add <= capacity:
            target = homes[0] if homes else _new(g.gid, made)
            for other in homes[1:]:
                _merge(target, other, owner)
        else:
            # the group spans more than a block: its new records join the cluster that holds most of
            # its records if they fit there, else they form their own cluster
            best = max(homes, key=lambda c: sum(owner.get(k) is c for k in live), default=None)
            if best is not None and best.nbytes + add <= capacity:
                target = best
            elif len(new) >= 2 and add <= capacity:
                target = _new(g.gid, made)
            else:
                # more new records than one block holds (a long prompt's KV chunks): block-sized runs of
                # them, each a cluster; dropped, the group was never relocated at all
                _runs(g.gid, due, new, sizes, capacity, owner, made)
                continue
        for k in new:
            owner[k] = target
            target.keys.append(k)
        target.nbytes += add
        target.gids.append(g.gid)
        target.due = target.due or due
    return [c for c in made if c.keys and len(c.keys) >= 2]


def borrow(made: Sequence[Cluster], groups: Sequence[tuple[Group, bool]], sizes: Mapping[bytes, int],
           capacity: int, copies_left: Mapping[bytes, int]) -> None:
    """Copies instead of tug-of-war (docs/copies.md): a group whose records are split over clusters,
    most valuable first, has the cluster holding most of its bytes borrow the others, while that
    cluster's bytes and borrowed bytes still fit `capacity` and the record may get another copy
    (`copies_left`: how many more each record may have, after those its value lists already). Borrowing
    does not make a cluster due: its copies ride along with a rewrite its own groups call for."""
    owner = {k: c for c in made for k in c.keys}
    left = dict(copies_left)
    for g, _due in groups:
        live = [k for k in dict.fromkeys(g.keys) if k in sizes]
        weight: dict[int, int] = {}
        for k in live:
            if k in owner:
                weight[id(owner[k])] = weight.get(id(owner[k]), 0) + sizes[k]
        if not weight or len(live) < 2:
            continue
        home = max(weight, key=lambda c: weight[c])
        target = next(owner[k] for k in live if id(owner.get(k)) == home)
        for k in live:
            if owner.get(k) is target or k in target.borrowed or left.get(k, 0) <= 0:
                continue
            if target.nbytes + target.borrowed_bytes + sizes[k] > capacity:
                continue
            target.borrowed.append(k)
            target.borrowed_bytes += sizes[k]
            left[k] -= 1


def _runs(gid: int, due: bool, new: list[bytes], sizes: Mapping[bytes, int], capacity: int,
          owner: dict[bytes, Cluster], made: list[Cluster]) -> None:
    """Records of group `gid` in consecutive clusters of at most `capacity` bytes each."""
    run: list[bytes] = []
    nbytes = 0
    for k in [*new, None]:
        if k is None or (run and nbytes + sizes[k] > capacity):
            if len(run) >= 2:
                c = _new(gid, made)  # each run is named by the group (a name, not a key: it may repeat)
                for r in run:
                    owner[r] = c
                c.keys, c.nbytes, c.gids, c.due = run, nbytes, [gid], due
            run, nbytes = [], 0
        if k is not None and sizes[k] <= capacity:
            run.append(k)
            nbytes += sizes[k]


def _new(gid: int, made: list[Cluster]) -> Cluster:
    c = Cluster(gid)
    made.append(c)
    return c


def _merge(into: Cluster, other: Cluster, owner: dict[bytes, Cluster]) -> None:
    for k in other.keys:
        owner[k] = into
    into.keys += other.keys
    into.gids += other.gids
    into.nbytes += other.nbytes
    into.due = into.due or other.due
    other.keys, other.gids, other.nbytes = [], [], 0  # emptied: dropped from build's result
