"""kill -9 crash loops with an expected-state oracle (../shared/notes/reliability.md §3).

The loop itself is tests/crash_loop.py (its docstring says what each cycle does and checks); these
tests run it: 30 cycles per durability mode in every CI run (`slow`; `BLOCKSTORE_CRASH_CYCLES`
lengthens it), and 3 quick cycles in the default run. Long runs use the same code from the command
line: `.venv/bin/python tests/crash_loop.py --cycles 1000 --mode sync`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from crash_loop import HOOKS, Summary, run  # noqa: E402


def _run(tmp_path: Path, mode: str, cycles: int, seed: int) -> Summary:
    s = run(tmp_path, mode, cycles, seed=seed, progress=print)
    print(s.report())
    assert s.ok, s.report()
    assert s.cycles == cycles and s.acked_ops > 0 and s.acked_checks > 0
    return s


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["sync", "cache", "mixed"])
def test_kill9_loop(tmp_path: Path, durability: str) -> None:
    """mixed: each writer and each check opens in sync or cache mode at random, so recoveries run in the other
    mode than the killed session (the MANIFEST's durability must hold the session to its own)."""
    cycles = int(os.environ.get("BLOCKSTORE_CRASH_CYCLES", "30"))
    s = _run(tmp_path, durability, cycles, seed=20261123 + ["sync", "cache", "mixed"].index(durability))
    if durability == "mixed":  # recoveries did run in the other mode than the killed session, both ways
        assert s.sessions["sync -> cache"] > 0 and s.sessions["cache -> sync"] > 0, s.sessions
    # the loop is only worth its time if it kills inside the write path and compaction, and if
    # compaction moved records while the writers ran
    at_hooks = sum(v for k, v in s.kills.items() if not k.startswith("timer"))
    assert at_hooks >= cycles // 4, s.kills
    assert any(k.startswith("compact.") for k in s.kills), s.kills
    assert s.cycles_compacted > 0 and s.compaction.get("relocated_bytes", 0) + s.compaction.get("gc_bytes", 0) > 0
    # and placement sent some namespace's large records to their own lineage before kills (its blocks were
    # there in a good share of the checked stores)
    assert s.cycles_with_large_lineage >= cycles // 4, s.report()


def test_kill9_once(tmp_path: Path) -> None:
    """A few quick cycles in the default (fast) run."""
    _run(tmp_path, "sync", 3, seed=7)


def test_every_hook_point_named_by_the_loop_exists() -> None:
    """A renamed hook point would silently turn its kills into timer kills."""
    import blockstore.hooks

    doc = blockstore.hooks.__doc__ or ""
    for name in HOOKS:
        assert name in doc, f"{name} is not a hook point listed in blockstore/hooks.py"


def test_a_writer_killed_before_it_made_the_store_is_nothing_to_check(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # An early kill (timed from the writer's start) on a loaded machine can land before the writer has made the
    # store folder; the loop then copied a folder that did not exist (FileNotFoundError, the whole loop failed).
    # Now such a cycle checks nothing, since nothing was acknowledged; a folder gone after acknowledged writes
    # would still be a violation.
    import crash_loop

    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(crash_loop, "WRITER", str(sleeper))
    monkeypatch.setattr(crash_loop, "_plan", lambda rng, hook_cycles: (None, 1))  # a timer kill from the start
    s = run(tmp_path / "work", "sync", 2, seed=1)
    assert s.ok and s.cycles == 2 and s.acked_ops == 0, s.report()
    assert not (tmp_path / "work" / "store").exists()
