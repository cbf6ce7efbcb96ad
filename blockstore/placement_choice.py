"""Placement choice: whether a namespace's writes follow the callers' partitions, their parents or the
namespace, judged on the store's own reads.

A caller's partition (a conversation, a session, a task) is a guess at what is read together. Where
requests read records that several partitions of a namespace wrote (a conversation's cached prefix
plus memory notes its tenant's other conversations just wrote), placing by partition spreads each
request over those partitions' blocks, and relocation cannot repair records that are read while they
are fresh (issue 16, `agents`: 1.15x the blocks/request of placing by namespace in full mode, and
relocation with an unlimited budget did not close it). Where requests read mostly what one partition
wrote (a task's own outputs, a chat's own prefix), placing by namespace interleaves every partition's
records, and the partition is the better guess.

So both are scored on the requests the store serves, against a shadow of each placement: each record
appended lately is labelled with the block it would sit in if its namespace were one lineage and the
block it would sit in if its partition were (each lineage filling blocks of the store's size in append
order). A request's labelled records touch some number of shadow blocks under each; a namespace whose
requests would touch at most _ENTER of the partitions' blocks under one lineage (a running mean over
its recent requests) is placed by namespace until that share passes _EXIT. Namespaces with fewer than
_MIN_REQUESTS scored requests follow the verdict of all namespaces' requests together (a tenant that
reads rarely is still a tenant).

Until its own reads decide, a namespace that has written less than a block is one lineage, in a store
of several namespaces: its records fit one block, and split by partition they can only spread, over
blocks shared with other writers (40 tenants of 4 conversations on 64 open blocks: 2.6 blocks a tenant
by partition, 1.0 as one lineage). Records are placed before any read says anything: in `agents` (quick) every
conversation starts at once and its first KV records are read for the rest of its life, so the
conversations placed by partition until the first verdict (a quarter of the bytes in) stayed split:
1.51 vs 1.29 blocks/request (seed 0). Past its first block a namespace follows its partitions (or the
store's verdict) until its own reads decide. The store's first namespace keeps its partitions while it
is the only one (one lineage would be a plain log); if a second comes while it is still small, it
continues the block its last partition writes to (no record of it moved mid-way). Quick, 3 seeds, full
/ append-only, same-run baselines: agents 1.19 -> 1.00, held-out with tenants as namespaces 1.01 ->
1.00, workspaces 1.01 -> 0.99, LMCache-shaped (two namespaces, each written from the start by chats
that straddle its first block) 0.87 -> 0.91 (seeds 3-5: 0.85 -> 0.81; full mode 0.74 -> 0.71); traces
of one namespace unchanged.

Every namespace is scored, whatever its share of the bytes. An earlier bound (a namespace writing over
an eighth of the bytes was not scored) froze the mode such a namespace had when it crossed the bound,
with the score of that moment: WebArena-shaped with each site a namespace (quick, seed 0, a quarter as
the bound) had sites chosen as one lineage while their records still fitted a block or two (shadow 1.0
vs 1.5-2.0 blocks) and kept that way as they grew past a quarter: 2.83 blocks/request (2.26 with an
eighth, 2.57 scored throughout, where sites whose lineage stops paying go back to their partitions).
Over 3 seeds (quick, full / append-only) scoring every namespace: sites as namespaces 0.966 -> 0.969,
agents 1.24 -> 1.19, held-out with tenants as namespaces 1.02 -> 1.01; traces of one namespace
unchanged (a store of one namespace labels nothing).

Between the two, a partition's parent (`parent_of`: "tenant/session" -> "tenant", a chunk session's
user): where requests read what several sessions of one tenant wrote (a session's newest records plus
its tenant's earlier ones), placing by session spreads each request over the sessions' blocks and
placing by namespace interleaves every tenant's; the parent is what they share. It is scored as a third
shadow lineage and chosen by the same shares over the partitions. Where the namespace qualifies too, the
mode in place stays until the other beats it by the same share, and a tie goes to the namespace unless
its partitions have several parents (a namespace of one tenant, its sessions' parent, is placed as
before). A store of one namespace labels records once two partitions of one parent are written (the
LMCache plugin's per-layer partitions never are), and is never one lineage. Full / append-only
blocks/request, medians (issue 16, H75): SWE-shaped (partition repo/task) quick 0.83 -> 0.67, full mode
0.73 -> 0.59; `sessions` (tenant/session) quick 0.66 -> 0.51, full mode 0.72 -> 0.47; traces without
such names, or whose reads do not favour the parents, unchanged (docs/compaction.md).

A namespace its own reads place as one lineage may also keep its large records (1/16 of a block or more)
in a second lineage: scored as a fourth shadow (the namespace's small records in one lineage, its large
ones in another) and taken by the same shares against the one lineage. Where requests draw at random among
a tenant's many small records, large records interleaved with them spread those over many blocks; where
requests read the newest records of both sizes together (a conversation's KV and the notes just written),
the split costs a block and is not taken. `heldout_ns` full mode (issue 16, H77): full / append-only 0.983
/ 0.995 -> 0.922 / 0.924 (seeds 2, 3: 0.980 / 0.992 -> 0.906 / 0.871); quick seed 0 1.014 -> 1.028 (a late
switch), seeds 1-3 unchanged or lower; every other trace unchanged (docs/compaction.md). Relocated clusters
are never split.

The coarsest this gets is what a caller that names no partition gets. Nothing here knows a workload:
the evidence is the store's reads, the only size the block size. Compaction's own streams (partition
names starting with NUL) are never redirected or scored. Memory: at most `max_labels` labels and
`max_names` lineages, scores and byte counts.

Not thread-safe except `observe`: the group-commit leader (placement.py) calls everything else.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockstore.directory import Location

_MAX_LABELS = 1 << 16  # records whose shadow places are kept (about 200 bytes each)
_PENDING_REQUESTS = 1024  # requests waiting for the leader to score them
# places (labelled records read) one resolve() scores at most: it runs on the group-commit leader's path, where
# every writer waits (1,024 requests of 256 places took 85 ms at once, H24); the rest wait for the next write
_LEARN_PLACES = 8192
_WEIGHT = 1 / 128  # weight of one request in a running score (about the last 128 requests)
_MIN_REQUESTS = 16  # requests scored before a namespace (or the store) may change how it is placed
_ENTER = 0.75  # place by namespace once its shadow touches at most this share of the partitions' blocks
_EXIT = 0.9  # ... and by partition again once it touches more than this share
# how a namespace is placed, each its index in a score (the same shares judge the parents)
_NAMESPACE, _PARTITION, _PARENT = 1, 2, 3
_ALL = b"\0all"  # the score of every namespace's requests together (not a namespace: starts with NUL)
_APART = 4  # a namespace placed as one lineage, its large records in a lineage of their own: the score's index
_LARGE_DIV = 16  # a large record: 1/16 of a block or more (a block holds at most 16 of them)
_LARGE = b"\0\0large"  # the caller-partition part of a namespace's lineage of large records


def large_lineage(ns: bytes) -> bytes:
    """The partition a namespace's lineage of large records writes (its blocks carry this partition's hash:
    fsck --repair names a namespace by it when the directory is lost)."""
    return ns + b"\0" + _LARGE


def _place(block_id: int, offset: int) -> int:
    """A record's place as one int (a label's key: a tuple took twice the memory)."""
    return block_id << 40 | offset


def parent_of(partition: bytes) -> bytes | None:
    """The parent of a caller's partition, in the same namespace: a chunk session's user (the partition
    chunk records and `Store.session_partition` name: "u", then the user and the session, each after its
    2-byte length), else what the part before its last "/" names ("tenant/session" -> "tenant"); None for
    a partition without one (or no partition at all)."""
    at = partition.find(b"\0")
    if at < 0:
        return None
    p = partition[at + 1 :]
    if p[:1] == b"u" and len(p) >= 5:
        end = 3 + int.from_bytes(p[1:3], "big")
        if end + 2 <= len(p) and int.from_bytes(p[end : end + 2], "big") == len(p) - end - 2:
            return partition[: at + 1 + end]
    cut = p.rfind(b"/")
    return partition[: at + 1 + cut] if cut > 0 else None


def namespace_of(partition: bytes) -> bytes:
    """The namespace part of a partition (`mutations.partition_of`: the namespace, then NUL and the
    caller's partition; compaction's own streams start with NUL)."""
    return partition.split(b"\0", 1)[0]


class _Lineages:
    """Shadow lineages: each name fills blocks of `capacity` bytes in append order (bounded LRU)."""

    def __init__(self, capacity: int, max_names: int) -> None:
        self.capacity = capacity
        self.max_names = max_names
        self.state: OrderedDict[bytes, list[int]] = OrderedDict()  # name -> [shadow block, bytes in it]
        self.next_block = 0

    def place(self, name: bytes, nbytes: int) -> int:
        """The shadow block a record of `nbytes` appended to `name`'s lineage lands in."""
        st = self.state.get(name)
        if st is None or (st[1] and st[1] + nbytes > self.capacity):
            st = [self.next_block, 0]
            self.next_block += 1
            self.state[name] = st
            while len(self.state) > self.max_names:
                self.state.popitem(last=False)
        self.state.move_to_end(name)
        st[1] += nbytes
        return st[0]


class PlacementChoice:
    """Per namespace: by partition (the default), by the partitions' parents or by namespace, whichever its
    reads favour."""

    def __init__(self, *, block_size: int, max_names: int, max_labels: int = _MAX_LABELS) -> None:
        self.max_names = max_names
        self._by_ns = _Lineages(block_size, max_names)
        self._by_partition = _Lineages(block_size, max_names)
        self._by_parent = _Lineages(block_size, max_names)
        self._by_size = _Lineages(block_size, max_names)  # one lineage per namespace, its large records apart
        self.large = max(1, block_size // _LARGE_DIV)
        # place (_place) of a record appended lately -> (namespace, shadow block by namespace, by
        # partition, by the partition's parent, by namespace with large records apart); `observe` on reader
        # threads only tests membership, the leader changes it
        self._labels: OrderedDict[int, tuple[bytes, int, int, int, int]] = OrderedDict()
        self.max_labels = max_labels
        self._pending: deque[list[tuple[int, int]]] = deque(maxlen=_PENDING_REQUESTS)
        # namespace (and _ALL) -> [requests, mean shadow blocks by namespace, by partition, by parent, by
        # namespace with large records apart]
        self._score: OrderedDict[bytes, list[float]] = OrderedDict()
        self.by_namespace: set[bytes] = set()  # namespaces placed by namespace now
        self.large_apart: set[bytes] = set()  # ... of those, the ones whose large records have a lineage apart
        self.by_parent: set[bytes] = set()  # namespaces placed by their partitions' parents now
        self.default_mode = _PARTITION  # the verdict of all requests, for namespaces with few of their own
        # namespace -> [bytes it appended, the name itself, the first parent of its partitions, whether they
        # have several] (an LRU of max_names namespaces)
        self._written: OrderedDict[bytes, list[Any]] = OrderedDict()
        self._last_partition: bytes | None = None  # while the store has one namespace: its last partition (_small)
        self._lineage_of: dict[bytes, bytes] = {}  # the store's first namespace -> the lineage it continues (_small)
        self.switches = 0  # changes of mode (for tests and the benchmark's profile)
        self._child: OrderedDict[bytes, bytes] = OrderedDict()  # parent -> the first partition of it seen (LRU)
        self.siblings = False  # two partitions of one parent were written: parents are scored from then on
        self.many_parents = False  # some namespace's partitions have several parents

    @property
    def default_by_namespace(self) -> bool:
        """Whether the store's requests as a whole favour one lineage per namespace."""
        return self.default_mode == _NAMESPACE

    # ---- reader side (any thread) ----

    def observe(self, _suffixes: Sequence[bytes], locs: Sequence[Location | None]) -> None:
        """A read observer: queue the places of this request's labelled records, if two or more are."""
        labels = self._labels
        if not labels:
            return  # a store of one namespace: nothing is labelled, nothing to score
        places = [(loc.block_id, loc.offset) for loc in locs if loc is not None and _place(loc.block_id, loc.offset) in labels]
        if len(places) >= 2:
            self._pending.append(places)  # deque.append is atomic: no lock on the read path

    # ---- leader side ----

    def resolve(self, partition: bytes, nbytes: int = 0) -> bytes:
        """The partition a record of `partition` (`nbytes` long; 0 for a relocated cluster) is placed by:
        its namespace while the namespace is placed by namespace or still small (_small), and a lineage
        of the namespace's large records while its reads favour that (_decide); its parent (if it has one)
        while the namespace is placed by parents, else itself. Scores the requests read since the last
        call first."""
        if self._pending:
            self._learn()
        # compaction's streams ("\0...") and the L2 adapter's tombstone streams ("...\0tombstones": tombstones
        # kept out of the data blocks so that evicting those stays whole-block) keep their own lineage
        if partition.startswith(b"\0") or partition.endswith(b"\0tombstones"):
            return partition
        ns = namespace_of(partition)
        if ns in self.by_namespace:
            if nbytes >= self.large and ns in self.large_apart:
                return large_lineage(ns)
            return self._lineage_of.get(ns, ns)
        if ns in self.by_parent:
            return parent_of(partition) or partition
        score = self._score.get(ns)
        if score is not None and score[0] >= _MIN_REQUESTS:
            return partition  # its own requests favour its partitions
        if (self.default_mode == _NAMESPACE and score is None) or self._small(ns, partition):
            return self._lineage_of.get(ns, ns)
        if self.default_mode == _PARENT and score is None:
            return parent_of(partition) or partition
        return partition

    def _small(self, ns: bytes, partition: bytes) -> bool:
        """Whether `ns` has written less than a block, in a store of several namespaces (module
        docstring: a namespace's first block is one lineage). While the store has one namespace, one
        lineage would be a plain log: its partitions keep their own. When a second comes while the
        first is still small, the first's lineage continues the block its last partition writes to
        (no record of it is moved to a lineage of its own mid-way)."""
        written = self._written
        if not written or (len(written) == 1 and ns in written):
            self._last_partition = partition
            return False
        if len(written) == 1 and self._last_partition is not None:  # the store's second namespace comes
            first = next(iter(written))
            if written[first][0] < self._by_ns.capacity:
                self._lineage_of[first] = self._last_partition
            self._last_partition = None
        seen = written.get(ns)
        return seen is None or seen[0] < self._by_ns.capacity

    def note_append(self, block_id: int, offset: int, partition: bytes, nbytes: int) -> None:
        """A record of the caller's `partition` (`nbytes` long) is appended at `offset` of block
        `block_id`: label it with its shadow blocks (the last `max_labels` records keep theirs). A store
        of one namespace labels nothing until two partitions of one parent are written: there is nothing
        to choose between."""
        if partition.startswith(b"\0"):
            return
        ns = namespace_of(partition)
        written = self._written
        seen = written.get(ns)
        if seen is None:
            seen = written[ns] = [0, ns, None, False]
            while len(written) > self.max_names:
                written.popitem(last=False)
        written.move_to_end(ns)
        seen[0] += nbytes
        parent = parent_of(partition)
        if parent is not None and not seen[3]:  # the namespace's parents: one (its first) or several
            seen[2] = seen[2] or parent
            if seen[2] != parent:  # (the store's flag: once any namespace has several)
                seen[3] = self.many_parents = True
        if len(written) < 2 and not self._siblings(partition, parent):
            return  # one namespace so far, no two partitions of one parent: nothing to choose between or keep
        ns = seen[1]  # one bytes object per namespace, shared by its labels
        labels = self._labels
        apart = ns + _LARGE if nbytes >= self.large else ns
        labels[_place(block_id, offset)] = (ns, self._by_ns.place(ns, nbytes), self._by_partition.place(partition, nbytes),
                                            self._by_parent.place(parent or partition, nbytes),
                                            self._by_size.place(apart, nbytes))
        while len(labels) > self.max_labels:
            labels.popitem(last=False)

    def _siblings(self, partition: bytes, parent: bytes | None) -> bool:
        """Whether two partitions of one parent have been written (until then a parent is its one partition
        and placing by it could change nothing: the plugin's "seg/..." partitions each have a parent of
        their own, and a store of one namespace keeps nothing per record for them)."""
        if self.siblings:
            return True
        if parent is not None:
            first = self._child.setdefault(parent, partition)
            self._child.move_to_end(parent)
            self.siblings = first != partition
            while len(self._child) > self.max_names:
                self._child.popitem(last=False)
        return self.siblings

    def _learn(self) -> None:
        touched: set[bytes] = set()
        budget = _LEARN_PLACES
        while self._pending and budget > 0:
            places = self._pending.popleft()
            budget -= len(places)
            found: dict[bytes, list[tuple[bytes, int, int, int, int]]] = {}
            for bid, off in places:
                lab = self._labels.get(_place(bid, off))
                if lab is not None:
                    found.setdefault(lab[0], []).append(lab)
            for ns, shadows in found.items():
                if len(shadows) >= 2:
                    blocks = [len({lab[i] for lab in shadows}) for i in (1, 2, 3, 4)]
                    self._note(ns, blocks)
                    self._note(_ALL, blocks)
                    touched.add(ns)
        if touched:
            self._decide(touched)

    def _note(self, ns: bytes, blocks: Sequence[int]) -> None:
        """One request of `ns` would touch `blocks` shadow blocks placed by namespace, by partition, by
        the partitions' parents and by namespace with large records apart."""
        score = self._score.get(ns)
        if score is None:
            score = self._score[ns] = [0.0, 0.0, 0.0, 0.0, 0.0]
            while len(self._score) > self.max_names:
                gone, _old = self._score.popitem(last=False)
                self.by_namespace.discard(gone)
                self.by_parent.discard(gone)
                self.large_apart.discard(gone)
        self._score.move_to_end(ns)
        score[0] += 1
        w = max(_WEIGHT, 1 / score[0])
        for i, b in enumerate(blocks, 1):
            score[i] += (b - score[i]) * w

    def _decide(self, touched: set[bytes]) -> None:
        """How each namespace is placed now: by namespace or by its partitions' parents where its own
        requests favour that clearly over its partitions (by namespace only in a store of several
        namespaces, and unless the parents beat it clearly too), as the store's requests as a whole say
        for those with too few requests of their own. Only the namespaces just scored are judged again,
        unless the overall verdict changed."""
        several = len(self._written) >= 2

        def verdict(score: list[float], was: int, many: bool) -> int:
            def beats(mode: int, other: int) -> bool:  # `mode` touches a clearly smaller share of blocks
                return score[mode] <= score[other] * (_EXIT if was == mode else _ENTER)

            by_ns = several and beats(_NAMESPACE, _PARTITION)
            if not beats(_PARENT, _PARTITION):
                return _NAMESPACE if by_ns else _PARTITION
            if not by_ns:
                return _PARENT
            # both coarser placements beat the partitions: the one placed now stays until the other beats it
            # clearly; else the better, and on a tie the parents only where the namespace has several (a
            # namespace of one tenant, its sessions' parent, is placed as before parents were scored)
            if was == _PARENT:
                return _NAMESPACE if score[_NAMESPACE] <= score[_PARENT] * _ENTER else _PARENT
            if was == _NAMESPACE:
                return _PARENT if score[_PARENT] <= score[_NAMESPACE] * _ENTER else _NAMESPACE
            return _PARENT if score[_PARENT] < score[_NAMESPACE] or (many and score[_PARENT] <= score[_NAMESPACE]) else _NAMESPACE

        overall = self._score.get(_ALL)
        default = (verdict(overall, self.default_mode, self.many_parents)
                   if overall is not None and overall[0] >= _MIN_REQUESTS else _PARTITION)
        if default != self.default_mode:
            self.default_mode = default
            self.switches += 1
            touched = set(self._score)
        for ns in touched:
            score = self._score.get(ns)
            if ns == _ALL or score is None:
                continue
            was = _NAMESPACE if ns in self.by_namespace else _PARENT if ns in self.by_parent else _PARTITION
            seen = self._written.get(ns)
            now = verdict(score, was, seen is not None and seen[3]) if score[0] >= _MIN_REQUESTS else default
            if now != was:
                (self.by_namespace.add if now == _NAMESPACE else self.by_namespace.discard)(ns)
                (self.by_parent.add if now == _PARENT else self.by_parent.discard)(ns)
                self.switches += 1
            self._set_apart(ns, score, several and now == _NAMESPACE and score[0] >= _MIN_REQUESTS)

    def _set_apart(self, ns: bytes, score: list[float], one_lineage: bool) -> None:
        """Whether a namespace its own requests place as one lineage gets a second lineage for its large
        records: where those requests would touch a clearly smaller share of the blocks so (the same shares
        as the modes), as when they draw among many small records of the namespace that large ones would
        otherwise spread over many blocks. Where they read the newest records of both sizes together, the
        split costs a block and is not taken."""
        was = ns in self.large_apart
        now = one_lineage and score[_APART] <= score[_NAMESPACE] * (_EXIT if was else _ENTER)
        if now != was:
            (self.large_apart.add if now else self.large_apart.discard)(ns)
            self.switches += 1
