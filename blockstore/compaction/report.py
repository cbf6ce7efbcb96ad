"""What one compaction pass did (or, in a dry run, would do): `PassReport`, the record the compactor fills,
the CLI prints and `blockstore compact --json` writes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class PassReport:
    """What one pass did (or, in a dry run, would do)."""

    dry_run: bool = False
    relocated_groups: int = 0  # clusters rewritten (clusters.py), each named by its most valuable group
    relocated_records: int = 0
    relocated_bytes: int = 0
    gc_blocks: int = 0
    gc_records: int = 0
    gc_bytes: int = 0
    reclaimed_blocks: int = 0
    lost_races: int = 0
    tombstones_carried: int = 0
    tombstones_dropped: int = 0
    copies_placed: int = 0  # copies of shared records placed with cluster rewrites (docs/copies.md)
    copies_dropped: int = 0  # places GC took out of values instead of copying them
    skipped_budget: int = 0  # GC victims and relocation moves left over their write budget
    skipped_budget_relocation: int = 0  # ... of which relocation moves (the CLI reports the two apart)
    skipped_room: int = 0  # GC victims left while the disk is low: their live records did not fit what was free
    skipped_shadow: int = 0  # scattered clusters left alone: moving them would not save their readers blocks
    planned_bytes: int = 0  # live bytes the planned moves copy (what a dry run would write)
    planned_gc_bytes: int = 0  # ... of which GC's (the planned victims' live bytes)
    stopped: str = ""  # run_until_idle: the NoSpace that ended it after earlier passes had freed space
    planned_groups: list[int] = field(default_factory=list)
    planned_victims: list[int] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        return bool(self.relocated_groups or self.gc_blocks)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["planned_groups"] = [f"{g:016x}" for g in self.planned_groups]
        d["planned_victims"] = [f"{b:016x}" for b in self.planned_victims]
        return d
