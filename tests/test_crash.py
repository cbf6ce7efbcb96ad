"""kill -9 crash loops with an expected-state oracle (docs: ../shared/notes/reliability.md §3).

A writer subprocess (tests/crash_writer.py) journals intent before and acknowledgement after each
operation; the supervisor kills it at random moments or at named hook points inside the write path,
reopens the store (running recovery) and checks every key against the journal:
- acknowledged and not followed by a pending op: exactly that value (both modes: kill -9 keeps the
  page cache, so even cache mode loses nothing acknowledged to a process crash);
- pending (intent without acknowledgement): the previous value or the new one, nothing else;
- acknowledged delete: absent (never resurrected).
Then the next cycle continues on the same store, so recovery runs over recovery.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import blockstore

sys.path.insert(0, str(Path(__file__).parent))
from crash_writer import KEYS, value_for

WRITER = str(Path(__file__).parent / "crash_writer.py")
HOOKS = ["write.begin", "write.appended", "write.before_directory", "write.committed", "block.delete"]


def _expected(journal: Path) -> dict[str, dict[object, str]]:
    """For each key, the values a correct store may hold (None = absent), each with the journal
    line that acknowledges it (used to settle pending operations once we have seen the outcome)."""
    state: dict[str, tuple[object, str]] = {}
    allowed: dict[str, dict[object, str]] = {}
    for line in journal.read_text().splitlines():
        phase, op, k, v = line.split()
        name = f"chunk{k}" if op == "chunk" else f"key{k}"
        new: object = None if op == "del" else (int(v) if op == "chunk" else value_for(int(k), int(v)))
        ack = f"A {op} {k} {v}"
        if phase == "I":
            old, old_ack = state.get(name, (None, f"A del {k} 0"))
            allowed[name] = {old: old_ack, new: ack}
        else:
            state[name] = (new, ack)
            allowed[name] = {new: ack}
    return allowed


def _verify(path: Path, journal: Path) -> int:
    allowed = _expected(journal)
    settle = []
    with blockstore.open(path, durability="sync", block_size=1 << 20) as s:
        assert s.recovery_report is not None, "an unclean stop must trigger recovery"
        keys = [f"key{k}" for k in range(KEYS)]
        got = s.get_many([k.encode() for k in keys])
        for name, g in zip(keys, got):
            ok = allowed.get(name, {None: f"A del {name[3:]} 0"})
            value = None if g is None else bytes(g)
            assert value in ok, f"{name}: not an allowed value after crash"
            settle.append(ok[value])
        present = set()
        for k in range(8):
            c = s.get_chunk("u", "s", f"c{k}")
            version = None if c is None else int(c.text.rsplit(" ", 1)[1])
            ok = allowed.get(f"chunk{k}", {None: ""})
            assert version in ok, f"chunk c{k}: version {version} not allowed"
            if ok[version]:
                settle.append(ok[version])
            if c is not None:
                present.add(f"c{k}")
        # the session index agrees with the records
        assert {c.chunk_id for c in s.list_chunks("u", "s")} == present
        assert s.stats().records == sum(1 for g in got if g is not None) + len(present)
    # what we observed is now the acknowledged state, pending operations included
    with journal.open("a") as j:
        j.write("".join(line + "\n" for line in settle))
    return len(settle)


def _run_cycles(tmp_path: Path, durability: str, cycles: int, seed: int) -> None:
    rng = random.Random(seed)
    store, journal = tmp_path / "store", tmp_path / "journal"
    journal.touch()
    for cycle in range(cycles):
        args = [sys.executable, WRITER, str(store), str(journal), durability, str(rng.randrange(2**31))]
        at_hook = cycle % 2 == 1
        if at_hook:
            args += [rng.choice(HOOKS), str(rng.randint(1, 40))]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # start the clock once the writer has the store open: on a loaded machine its start-up alone
        # can outlast the delay, and a kill before the store is open tests nothing
        assert p.stdout is not None
        opened = p.stdout.readline().decode().strip()
        assert opened == "opened" or p.poll() is not None, opened
        deadline = time.time() + (4 if at_hook else rng.uniform(0.3, 1.5))
        while time.time() < deadline and p.poll() is None:
            time.sleep(0.02)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        err = p.stderr.read().decode() if p.stderr else ""
        assert p.returncode == -signal.SIGKILL, f"writer exited by itself ({p.returncode}): {err}"
        _verify(store, journal)


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["sync", "cache"])
def test_kill9_loop(tmp_path: Path, durability: str) -> None:
    cycles = int(os.environ.get("BLOCKSTORE_CRASH_CYCLES", "16"))
    _run_cycles(tmp_path, durability, cycles, seed=20261123)


def test_kill9_once(tmp_path: Path) -> None:
    """One quick cycle of each kind, in the default (fast) run."""
    _run_cycles(tmp_path, "sync", 2, seed=7)
