"""Compaction: invalid-ratio GC and affinity-aware relocation (importable as `blockstore.compaction`).

Plugs into the engine only through its public seams: read observations (`Store.add_read_observer`),
the compare-and-swap move (`Store.relocate_many`), verified reads of places (`Store.read_locations`),
the block table and the reverse index. Start it with `blockstore.open(path, compaction="full")` (a
background thread) or run passes with `blockstore compact PATH`.
"""

from .affinity import AffinityJudge, AffinityTracker, CoAccessJudge, Group
from .compactor import Compactor, PassReport, attach
from .gc import GC_PARTITION
from .policy import DISABLED, POLICIES, Policy, disabled, resolve
from .relocation import RELOCATION_PARTITION

__all__ = [
    "DISABLED",
    "GC_PARTITION",
    "POLICIES",
    "RELOCATION_PARTITION",
    "AffinityJudge",
    "AffinityTracker",
    "CoAccessJudge",
    "Compactor",
    "Group",
    "PassReport",
    "Policy",
    "attach",
    "disabled",
    "resolve",
]
